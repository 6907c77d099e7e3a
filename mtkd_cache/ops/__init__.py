"""Operations on a finished cache: verify (checksums, fingerprints) and inspect (report, plot)."""
