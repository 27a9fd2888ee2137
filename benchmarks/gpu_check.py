"""The GPU check in one call: what a lent GPU must confirm, written as one JSON file and one markdown table.

    python benchmarks/gpu_check.py --out DIR                       # on a GPU: ≤ 8 minutes on one H100
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny   # the same checks at toy sizes (well under 3 min)

Writes ``DIR/gpu_check.json`` (every measurement, tolerance and verdict) and ``DIR/gpu_check.md`` (the table).
Sections (each row says ``ok``, ``FAIL`` or ``skipped: why``; the exit status is 1 when a row fails):

1. ``demo``: the embedded task's quick demo (``shiq_llm.experiments.demo.demo_sweep_config``: the reference, the
   offline rows, ShiQ at β = 0.1, then sampling on held-out prompts) trained twice on the same data: float32 on
   the CPU, and bf16 mixed precision on the device (``--device cpu``: bf16 autocast on the CPU). Mean reward and
   KL must agree within noise: ``|Δ| ≤ 3·√(se₁² + se₂²) + floor`` (se: the evaluation's standard errors; the
   floor, 0.03 for the reward in [0, 1] and 0.05 nats for the KL, covers the two runs' different training
   trajectories, which the evaluation's standard errors do not).
2. ``head``: one forward + backward of the per-token statistics head (``shiq_llm.core.stats.linear_head_token_stats``,
   N response tokens, hidden H, V = 32,000 and 128,256 in bf16) against TRL's ``ChunkedLogProbFunction`` (its
   Triton kernel on a GPU, torch tiles elsewhere) on the same hidden states, weight and targets: median time
   over repeats and peak memory growth; the log-probabilities ℓ − vℓ must match TRL's to 2e-2 (bf16 inputs,
   float32 statistics).
3. ``trainer``: ShiQTrainer (loss_type shiq) against TRL's DPOTrainer (``precompute_ref_log_probs=True``) on a
   Llama built from a config (~100M parameters at V = 128,256: hidden 512, 8 layers, tied head; ``--tiny``: a
   toy one), bf16 mixed precision, the same pairs and tokens per step: seconds per step (steps 2 … S) and peak
   memory of training (reference passes before it excluded).
4. ``bf16``: one ShiQ loss and its gradients on a batch, in bf16 autocast against float32 on the same model
   and batch: relative loss difference ≤ 2e-2, gradient cosine similarity ≥ 0.99 and relative L2 difference
   ≤ 0.1.

Packages: torch, transformers, accelerate and peft are needed; trl (sections 2 and 3) and datasets (section 1,
3) are imported only when used, and a section that lacks one is recorded as ``skipped: trl not installed``
instead of failing. To bring them to a machine without network access, carry wheels: on this machine,
``pip download trl datasets --no-deps -d wheels/`` (plus any of their dependencies missing there), then on the
GPU machine ``pip install --no-index --find-links wheels/ trl datasets`` before the check.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import PeakMemory, random_texts, step_clock, versions, word_tokenizer  # noqa: E402

#: Sizes of the full check (a GPU) and of ``--tiny`` (a CPU, for the test suite).
SIZES = {
    "full": dict(demo_ref_steps=600, demo_steps=150, demo_batch=32, demo_completions=16, demo_eval_samples=16,
                 head_tokens=8192, head_hidden=2048, head_vocabs=[32000, 128256], head_repeats=5,
                 model=dict(hidden_size=512, num_layers=8, num_heads=8, vocab=128256), trainer_pairs=8,
                 trainer_prompt=128, trainer_response=384, trainer_steps=8,
                 bf16_model=dict(hidden_size=512, num_layers=4, num_heads=8, vocab=32000), bf16_batch=8, bf16_length=256),
    "tiny": dict(demo_ref_steps=10, demo_steps=3, demo_batch=8, demo_completions=1, demo_eval_samples=1,
                 head_tokens=256, head_hidden=64, head_vocabs=[2000, 8000], head_repeats=2,
                 model=dict(hidden_size=64, num_layers=2, num_heads=4, vocab=1000), trainer_pairs=2,
                 trainer_prompt=8, trainer_response=16, trainer_steps=3,
                 bf16_model=dict(hidden_size=64, num_layers=2, num_heads=4, vocab=500), bf16_batch=4, bf16_length=32),
}
DEMO_FLOOR = {"mean_reward": 0.03, "kl": 0.05}
HEAD_LOGPROB_TOL = 2e-2
BF16_TOL = {"loss_rel": 2e-2, "grad_cosine": 0.99, "grad_rel_l2": 0.1}


def _missing(*modules: str) -> str | None:
    absent = [m for m in modules if importlib.util.find_spec(m) is None]
    return f"skipped: {', '.join(absent)} not installed" if absent else None


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# --------------------------------------------------------------------------------------------------
# 1. The demo: float32 on the CPU against bf16 on the device
# --------------------------------------------------------------------------------------------------


def check_demo(out: Path, device: str, sizes: dict) -> list[dict]:
    skip = _missing("datasets")
    if skip:
        return [{"section": "demo", "name": "reward and KL, bf16 vs fp32", "status": skip}]
    import dataclasses

    from shiq_llm.experiments.demo import DemoConfig, demo_sweep_config, quiet_libraries
    from shiq_llm.experiments.sweep import run_sweep
    from shiq_llm.tasks import synthetic
    from shiq_toy.experiments import num_threads

    quiet_libraries()
    data = out / "demo" / "data"
    config = DemoConfig.quick(out=str(out / "demo"), steps=sizes["demo_steps"], batch_size=sizes["demo_batch"],
                              eval_samples=sizes["demo_eval_samples"], ref_steps=sizes["demo_ref_steps"],
                              completions_per_prompt=sizes["demo_completions"], progress=False, algos=("shiq",))
    tick = time.perf_counter()
    with num_threads(config.threads):
        synthetic.make_data(data, reference=synthetic.ReferenceConfig(steps=config.ref_steps, seed=config.seed),
                            completions_per_prompt=config.completions_per_prompt,
                            max_new_tokens=config.max_new_tokens, seed=config.seed)
    runs = {}
    settings = {"fp32 cpu": ({"use_cpu": True}, {"device": "cpu", "dtype": "float32"}),
                f"bf16 {device}": ({"use_cpu": device == "cpu", "bf16": True}, {"device": device, "dtype": "bfloat16"})}
    for label, (train, evaluation) in settings.items():
        base = demo_sweep_config(dataclasses.replace(config, out=str(out / "demo" / label.replace(" ", "_"))), data)
        sweep = dataclasses.replace(base, train={**base.train, **train}, evaluation={**base.evaluation, **evaluation})
        with num_threads(config.threads):
            results = run_sweep(sweep, log=lambda message: None, progress=False)
        runs[label] = next(row for row in results if row.get("algo") == "shiq")
    (a, b) = runs.values()
    rows = []
    for key, sem in (("mean_reward", "reward_sem"), ("kl", "kl_sem")):
        noise = 3 * math.sqrt(a[sem] ** 2 + b[sem] ** 2) + DEMO_FLOOR[key]
        diff = b[key] - a[key]
        rows.append({"section": "demo", "name": f"{key}: bf16 {device} − fp32 cpu", "value": diff,
                     "reference": a[key], "candidate": b[key], "tolerance": noise,
                     "status": "ok" if _finite(diff) and abs(diff) <= noise else "FAIL",
                     "note": f"3·SE + {DEMO_FLOOR[key]}; {time.perf_counter() - tick:.0f} s for both runs"})
    return rows


# --------------------------------------------------------------------------------------------------
# 2. The statistics head against TRL's kernel
# --------------------------------------------------------------------------------------------------


def check_head(device: str, sizes: dict) -> list[dict]:
    import torch

    from shiq_llm.core.stats import linear_head_token_stats

    skip = _missing("trl")
    rows = []
    n, hidden_size = sizes["head_tokens"], sizes["head_hidden"]
    for vocab in sizes["head_vocabs"]:
        if skip:
            rows.append({"section": "head", "name": f"V = {vocab}: time and memory vs TRL", "status": skip})
            continue
        from trl.kernels import ChunkedLogProbFunction

        gen = torch.Generator(device="cpu").manual_seed(vocab)
        dt = torch.bfloat16
        h0 = torch.randn(n, hidden_size, generator=gen).to(device, dt)
        w0 = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5).to(device, dt)
        targets = torch.randint(0, vocab, (n,), generator=gen).to(device)
        upstream = torch.randn(2, n, generator=gen).to(device)

        def ours():
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            taken, lse = linear_head_token_stats(h, w, targets)
            (upstream[0] * taken + upstream[1] * lse).sum().backward()
            return (taken - lse).detach()

        def trl():
            h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
            logp = ChunkedLogProbFunction.apply(h, w, None, targets, 1.0, 4096, None, 1.0, ())[0]
            (upstream[0] * logp).sum().backward()
            return logp.detach().float()

        result = {}
        for name, fn in (("ours", ours), ("trl", trl)):
            fn()  # warm-up (Triton compilation, allocator)
            times = []
            for _ in range(sizes["head_repeats"]):
                _sync(device)
                tick = time.perf_counter()
                fn()
                _sync(device)
                times.append(time.perf_counter() - tick)
            memory = PeakMemory(device).start()
            logp = fn()
            result[name] = {"seconds": statistics.median(times), "peak_mib": memory.stop() / 2**20, "logp": logp}
        diff = float((result["ours"]["logp"] - result["trl"]["logp"]).abs().max())
        kernel = "Triton" if device.startswith("cuda") and importlib.util.find_spec("triton") else "torch tiles"
        o, t = result["ours"], result["trl"]
        rows.append({"section": "head", "name": f"V = {vocab}: time ours / TRL ({kernel})", "value": o["seconds"] / t["seconds"],
                     "reference": t["seconds"], "candidate": o["seconds"], "status": "ok" if _finite(o["seconds"]) else "FAIL",
                     "note": f"N = {n}, H = {hidden_size}, bf16, fwd+bwd, median of {sizes['head_repeats']}"})
        rows.append({"section": "head", "name": f"V = {vocab}: peak memory ours / TRL", "value": o["peak_mib"] / max(t["peak_mib"], 1e-9),
                     "reference": t["peak_mib"], "candidate": o["peak_mib"], "status": "ok" if _finite(o["peak_mib"]) else "FAIL",
                     "note": "MiB; " + ("cuda max_memory_allocated" if device.startswith("cuda") else "CPU resident set, in-process")})
        rows.append({"section": "head", "name": f"V = {vocab}: max abs. difference of log p, ours vs TRL", "value": diff, "tolerance": HEAD_LOGPROB_TOL,
                     "status": "ok" if diff <= HEAD_LOGPROB_TOL else "FAIL", "note": "ℓ − vℓ against TRL's log-probabilities"})
    return rows


# --------------------------------------------------------------------------------------------------
# 3. ShiQTrainer against TRL's DPOTrainer on a ~100M-parameter model
# --------------------------------------------------------------------------------------------------


def _train(trainer_name: str, device: str, sizes: dict, out: Path) -> dict:
    import torch

    from shiq_llm.core.models import tiny_causal_lm

    spec = sizes["model"]
    tokenizer = word_tokenizer(spec["vocab"])
    length = sizes["trainer_prompt"] + sizes["trainer_response"] + 2
    model = tiny_causal_lm(tokenizer, hidden_size=spec["hidden_size"], num_layers=spec["num_layers"],
                           num_heads=spec["num_heads"], max_positions=max(length, 64), seed=0).to(device)
    params = sum(p.numel() for p in model.parameters())
    pairs, steps = sizes["trainer_pairs"], sizes["trainer_steps"]
    texts = random_texts(spec["vocab"], pairs * steps, prompt_words=sizes["trainer_prompt"],
                         response_words=sizes["trainer_response"])
    common = dict(output_dir=str(out / f"trainer_{trainer_name}"), max_steps=steps, learning_rate=1e-5,
                  logging_steps=steps, save_strategy="no", report_to="none", disable_tqdm=True,
                  use_cpu=device == "cpu", bf16=True, dataloader_pin_memory=False, seed=0)
    clock = step_clock(torch.cuda.synchronize if device.startswith("cuda") else None)
    if trainer_name == "shiq":
        from shiq_llm import ShiQConfig, ShiQTrainer

        rows = [{"prompt": p, "completion": c, "reward": r} for p, a, b in texts for c, r in ((a, 1.0), (b, 0.0))]
        args = ShiQConfig(loss_type="shiq", beta=0.1, per_device_train_batch_size=2 * pairs, max_length=length, **common)
        trainer = ShiQTrainer(model, args, train_dataset=rows, processing_class=tokenizer, callbacks=[clock])
    else:
        import datasets
        from trl import DPOConfig, DPOTrainer

        data = datasets.Dataset.from_dict({"prompt": [t[0] for t in texts], "chosen": [t[1] for t in texts],
                                           "rejected": [t[2] for t in texts]})
        args = DPOConfig(beta=0.1, per_device_train_batch_size=pairs, precompute_ref_log_probs=True,
                         max_length=length, **common)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[clock])
        trainer.get_train_dataloader()  # TRL precomputes the reference log-probabilities here: outside the measure
    memory = PeakMemory(device).start()
    trainer.train()
    peak = memory.stop() / 2**20
    del trainer, model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"step_s": statistics.median(clock.step_seconds), "peak_mib": peak, "params": params}


def check_trainer(out: Path, device: str, sizes: dict) -> list[dict]:
    skip = _missing("trl", "datasets")
    if skip:
        return [{"section": "trainer", "name": "ShiQTrainer vs DPOTrainer", "status": skip}]
    shiq, trl = _train("shiq", device, sizes, out), _train("trl", device, sizes, out)
    note = (f"{shiq['params'] / 1e6:.1f}M parameters, V = {sizes['model']['vocab']}, {2 * sizes['trainer_pairs']} "
            f"sequences of {sizes['trainer_prompt']} + {sizes['trainer_response']} tokens per step, bf16")
    return [
        {"section": "trainer", "name": "seconds per step ShiQ / TRL DPO", "value": shiq["step_s"] / trl["step_s"],
         "reference": trl["step_s"], "candidate": shiq["step_s"], "status": "ok" if _finite(shiq["step_s"]) else "FAIL",
         "note": note},
        {"section": "trainer", "name": "peak memory ShiQ / TRL DPO", "value": shiq["peak_mib"] / max(trl["peak_mib"], 1e-9),
         "reference": trl["peak_mib"], "candidate": shiq["peak_mib"], "status": "ok" if _finite(shiq["peak_mib"]) else "FAIL",
         "note": "MiB during training"},
    ]


# --------------------------------------------------------------------------------------------------
# 4. bf16 loss and gradients against float32
# --------------------------------------------------------------------------------------------------


def check_bf16(device: str, sizes: dict) -> list[dict]:
    import torch

    from shiq_llm.core.models import tiny_causal_lm
    from shiq_llm.core.stats import response_token_stats
    from shiq_llm.train.trainer import algorithm_loss
    from shiq_toy.losses import TokenStats

    spec = sizes["bf16_model"]
    model = tiny_causal_lm(spec["vocab"], hidden_size=spec["hidden_size"], num_layers=spec["num_layers"],
                           num_heads=spec["num_heads"], max_positions=sizes["bf16_length"] + 8, seed=0).to(device)
    gen = torch.Generator().manual_seed(0)
    batch, length = sizes["bf16_batch"], sizes["bf16_length"]
    ids = torch.randint(3, spec["vocab"], (batch, length), generator=gen).to(device)
    attention = torch.ones_like(ids)
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, length // 4:] = True
    rewards = torch.where(mask, 0.01 * torch.rand(batch, length, generator=gen).to(device), 0.0)  # the loss moves with π
    with torch.no_grad():  # the reference: the same model, as ShiQ's cache at the start, moved off its fixed point
        ref = response_token_stats(model, ids, attention, mask)
        ref = TokenStats(torch.where(mask, ref.logit_taken + 0.1 * torch.randn(ref.logit_taken.shape, generator=gen).to(device), 0.0),
                         ref.logsumexp)
    parameters = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grad(autocast: bool):
        model.zero_grad(set_to_none=True)
        context = torch.autocast(device.split(":")[0], dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with context:
            stats = response_token_stats(model, ids, attention, mask)
            loss = algorithm_loss("shiq", stats, ref, {"response_mask": mask, "rewards": rewards}, beta=0.1)[0]
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten().float() for p in parameters])

    loss32, grad32 = loss_and_grad(False)
    loss16, grad16 = loss_and_grad(True)
    rel = abs(loss16 - loss32) / abs(loss32)
    cosine = float(torch.nn.functional.cosine_similarity(grad16, grad32, dim=0))
    rel_l2 = float((grad16 - grad32).norm() / grad32.norm())
    note = f"ShiQ loss, {batch} × {length} tokens, V = {spec['vocab']}, H = {spec['hidden_size']}"
    return [
        {"section": "bf16", "name": "loss: relative difference bf16 vs fp32", "value": rel, "reference": loss32,
         "candidate": loss16, "tolerance": BF16_TOL["loss_rel"], "status": "ok" if rel <= BF16_TOL["loss_rel"] else "FAIL",
         "note": note},
        {"section": "bf16", "name": "gradient: cosine similarity bf16 vs fp32", "value": cosine,
         "tolerance": BF16_TOL["grad_cosine"], "status": "ok" if cosine >= BF16_TOL["grad_cosine"] else "FAIL",
         "note": "at least the tolerance"},
        {"section": "bf16", "name": "gradient: relative L2 difference bf16 vs fp32", "value": rel_l2,
         "tolerance": BF16_TOL["grad_rel_l2"], "status": "ok" if rel_l2 <= BF16_TOL["grad_rel_l2"] else "FAIL",
         "note": "‖g_bf16 − g_fp32‖ / ‖g_fp32‖"},
    ]


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _cell(x) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"GPU check on {env['device_name']} ({env['device']}), {env['versions']}; {report['mode']} sizes; "
             f"{report['seconds']:.0f} s", "",
             "| section | check | value | reference | candidate | tolerance | status | note |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k in ("section", "name", "value", "reference", "candidate",
                                                                       "tolerance", "status", "note")) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test of this script)")
    parser.add_argument("--sections", nargs="+", default=["demo", "head", "trainer", "bf16"],
                        choices=["demo", "head", "trainer", "bf16"], help="the checks to run (default: all)")
    args = parser.parse_args(argv)
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        parser.error(f"--device must be cpu or cuda, got {device!r}")
    sizes = SIZES["tiny" if args.tiny else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = {"device": device, "python": platform.python_version(),
           "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
           "versions": versions("torch", "transformers", "accelerate", "peft", "triton", "trl", "datasets"),
           "threads": torch.get_num_threads()}
    rows, timings = [], {}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        scratch = Path(scratch)
        checks = {"demo": lambda: check_demo(scratch, device, sizes), "head": lambda: check_head(device, sizes),
                  "trainer": lambda: check_trainer(scratch, device, sizes), "bf16": lambda: check_bf16(device, sizes)}
        for name in args.sections:
            tick = time.perf_counter()
            rows += checks[name]()
            timings[name] = time.perf_counter() - tick
            print(f"gpu_check: {name} done in {timings[name]:.0f} s", file=sys.stderr, flush=True)
    report = {"mode": "tiny" if args.tiny else "full", "environment": env, "sizes": sizes, "rows": rows,
              "section_seconds": timings, "seconds": time.perf_counter() - started,
              "tolerances": {"demo_floor": DEMO_FLOOR, "head_logprob": HEAD_LOGPROB_TOL, "bf16": BF16_TOL}}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (args.out / "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    return 1 if any(row["status"] == "FAIL" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
