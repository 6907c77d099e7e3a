"""Instruction distillation on real data: SmolLM2-135M-Instruct -> a small student, with its own chat template.

Data: WordNet noun glosses (``apt-get install wordnet-base``) as definition questions,
``user: What does the word "X" mean?`` -> ``assistant: <gloss>.``, rendered with SmolLM2's own
chat template. Train on the first ``--train`` questions, evaluate the assistant-token perplexity on
the next ``--eval``.

Three students per seed (same architecture, init and data order):
* mask-on: KD + CE on the assistant's tokens only (``--train-on assistant``, alpha 0.5);
* mask-off: KD + CE on every token (``--train-on all``), scored on the assistant's tokens;
* no-KD: CE only on the assistant's tokens (alpha 0).

Packing: the glosses as plain text, prepared packed and unpacked; the teacher's cached targets of
each packed document are compared with the teacher on that document alone (max |delta log p|), and
training throughput (real tokens per second) is measured on both.

Run: ``python -m benchmarks.instruction --teacher DIR --out DIR`` (DIR: a SmolLM2 folder in
safetensors, e.g. from ``benchmarks._models.ensure_smollm2``). Writes ``OUT/results.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtkd_cache import RunConfig, open_cache, prepare, run_teacher
from mtkd_train.config import TrainConfig
from mtkd_train.evaluate import evaluate_student
from mtkd_train.recipe import DistillRecipe

WORDNET = Path("/usr/share/wordnet/data.noun")


def glosses(n: int) -> list[tuple[str, str]]:
    """(word, definition) of ``n`` WordNet nouns, evenly spread over the file."""
    rows = []
    for line in WORDNET.read_text(errors="replace").splitlines():
        if line.startswith("  ") or " | " not in line:
            continue
        head, gloss = line.split(" | ", 1)
        word = head.split()[4].replace("_", " ")
        definition = gloss.split(";")[0].strip().strip('"')
        if 3 <= len(definition.split()) <= 16 and word.isascii():
            rows.append((word, definition))
    step = max(1, len(rows) // n)
    return rows[::step][:n]


def write_data(root: Path, pairs: list[tuple[str, str]], name: str) -> tuple[Path, Path]:
    chat, text = root / f"{name}_chat.jsonl", root / f"{name}_text.jsonl"
    with chat.open("w") as f:
        for w, d in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": f'What does the word "{w}" mean?'},
                                             {"role": "assistant", "content": d[0].upper() + d[1:] + "."}]}) + "\n")
    with text.open("w") as f:
        for w, d in pairs:
            f.write(json.dumps({"text": f"{w}: {d}."}) + "\n")
    return chat, text


def student_config(root: Path, teacher: Path) -> Path:
    from transformers import AutoConfig, LlamaConfig

    t = AutoConfig.from_pretrained(teacher)
    cfg = LlamaConfig(vocab_size=t.vocab_size, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id,
                      architectures=["LlamaForCausalLM"])
    folder = root / "student_config"
    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    return folder


def train_and_eval(cache: Path, eval_cache: Path, student: Path, out: Path, *, seed: int, alpha: float,
                   steps: int, batch: int) -> dict[str, Any]:
    cfg = TrainConfig(cache=str(cache), teachers=("t",), student=str(student), out=str(out), batch_size=batch,
                      max_steps=steps, checkpoint_every=0, lr=3e-3, warmup_steps=5, aggregate="mean",
                      alpha=alpha, seed=seed, num_workers=0, progress=False, device="cpu", amp="off")
    recipe = DistillRecipe(cfg).setup()
    t0 = time.perf_counter()
    recipe.train()
    seconds = time.perf_counter() - t0
    res = evaluate_student(recipe.student, open_cache(eval_cache), batch_size=16)
    return {"perplexity": res["perplexity"], "positions": res["positions"], "scored": res["scored"],
            "train_seconds": seconds, "final_loss": recipe.losses[-1]}


def packed_equality(cache: Path, teacher: Path, samples: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    reader = open_cache(cache)
    worst, docs = 0.0, 0
    for i in range(samples):
        s = reader.sample(i, ["t"])
        starts = sorted({0, *(reader.samples.column("doc_starts")[i].as_py() or [])}) + [s["num_positions"]]
        ids = torch.as_tensor(s["token_ids"])
        for a, b in zip(starts, starts[1:]):
            with torch.no_grad():
                alone = torch.log_softmax(model(input_ids=ids[a:b][None]).logits[0].float(), -1)
            got = np.take_along_axis(alone.numpy(), s["targets"]["t"].indices[a:b].astype(np.int64), -1)
            worst = max(worst, float(np.abs(s["targets"]["t"].logp[a:b] - got).max()))
            docs += 1
    return {"documents": docs, "max_abs_logp_diff": worst}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train", type=int, default=200)
    p.add_argument("--eval", type=int, default=60)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    pairs = glosses(a.train + a.eval)
    train_chat, train_text = write_data(a.out, pairs[: a.train], "train")
    eval_chat, _ = write_data(a.out, pairs[a.train :], "eval")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(a).items()}}

    def log(key: str, value: Any) -> None:
        results[key] = value
        (a.out / "results.json").write_text(json.dumps(results, indent=2))
        print(key, json.dumps(value), flush=True)

    caches = {}
    for mode in ("assistant", "all"):
        c = a.out / f"cache_{mode}"
        prepare(c, train_chat, tokenizer=a.teacher, max_length=96, messages_column="messages", train_on=mode,
                progress=False)
        t0 = time.perf_counter()
        run_teacher(c, RunConfig(teacher="t", model=str(a.teacher), top_k=32, batch_size=8), progress=False)
        caches[mode] = c
        log(f"teacher_run_{mode}", {"seconds": time.perf_counter() - t0,
                                    "positions": open_cache(c).inputs.num_positions})
    ev = a.out / "cache_eval"
    prepare(ev, eval_chat, tokenizer=a.teacher, max_length=96, messages_column="messages", progress=False)
    student = student_config(a.out, a.teacher)
    packing(a, train_text, student, log)
    for seed in range(a.seeds):
        for name, mode, alpha in (("mask_on", "assistant", 0.5), ("mask_off", "all", 0.5), ("no_kd", "assistant", 0.0)):
            r = train_and_eval(caches[mode], ev, student, a.out / f"run_{name}_{seed}", seed=seed, alpha=alpha,
                               steps=a.steps, batch=a.batch)
            log(f"{name}_seed{seed}", r)
    summary = {}
    for name in ("mask_on", "mask_off", "no_kd"):
        ppl = [results[f"{name}_seed{s}"]["perplexity"] for s in range(a.seeds)]
        summary[name] = {"mean": statistics.mean(ppl), "stdev": statistics.stdev(ppl) if len(ppl) > 1 else 0.0,
                         "per_seed": ppl}
    log("assistant_token_perplexity", summary)


def packing(a: argparse.Namespace, text: Path, student: Path, log: Any) -> None:
    rates = {}
    for packed in (True, False):
        c = a.out / f"cache_text_{'packed' if packed else 'unpacked'}"
        prepare(c, text, tokenizer=a.teacher, max_length=128, pack=packed, progress=False)
        run_teacher(c, RunConfig(teacher="t", model=str(a.teacher), top_k=16, value_codec="fp32",
                                 tail_dtype="float32", batch_size=8), progress=False)
        if packed:
            log("packed_equality", packed_equality(c, a.teacher, samples=4))
        reader = open_cache(c)
        per_sample = reader.inputs.num_positions / reader.inputs.num_samples
        steps = 20
        cfg = TrainConfig(cache=str(c), teachers=("t",), student=str(student), out=str(a.out / f"tp_{packed}"),
                          batch_size=a.batch, max_steps=steps, checkpoint_every=0, lr=1e-3, warmup_steps=0,
                          aggregate="mean", num_workers=0, progress=False, device="cpu", amp="off")
        recipe = DistillRecipe(cfg).setup()
        t0 = time.perf_counter()
        recipe.train()
        seconds = time.perf_counter() - t0
        rates["packed" if packed else "unpacked"] = {"tokens_per_s": steps * a.batch * per_sample / seconds,
                                                     "seconds": seconds, "tokens_per_sample": per_sample}
    rates["ratio_packed_over_unpacked"] = rates["packed"]["tokens_per_s"] / rates["unpacked"]["tokens_per_s"]
    log("packing_throughput", rates)


if __name__ == "__main__":
    main()
