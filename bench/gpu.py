"""On a GPU: learner MFU and teacher-scoring throughput of the real Qwen2.5-VL-3B architecture (random weights,
bf16), each against the bf16 dense peak of the device. Skips (exit 0, says so) where no CUDA device is present.

Learner: forward + backward of the language model on `--tokens` tokens through `hidden_at` and the chunked
`hidden`-payload loss (what a learner rank runs), with activation checkpointing; FLOPs counted as 6 x parameters x
tokens + attention (12 x layers x d x T^2 per sequence). Teacher: `hidden_at` under no_grad (2 x parameters x
tokens + attention / 3). The 7.5 GB weight push is measured by `bench/weight_push.py --mb 7500`.

    python bench/gpu.py --tokens 4096 --rows 4
"""

from __future__ import annotations

import argparse
import time

from common import table

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}  # dense, no sparsity


def qwen25vl_3b():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vigos_ray.tiny import QWEN25VL_3B

    config = Qwen2_5_VLConfig(text_config=QWEN25VL_3B["text"], vision_config=QWEN25VL_3B["vision"],
                              tie_word_embeddings=QWEN25VL_3B["tie_word_embeddings"])  # fmt: skip
    return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype="bfloat16")


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per sequence")
    ap.add_argument("--rows", type=int, default=4, help="sequences per pass")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; skipped (run it on a GPU machine)")
        return
    from vigos_ray.losses import DivergenceSpec, token_losses
    from vigos_ray.scoring import hidden_at
    from vigos_ray.types import ScoreRow, TeacherTargets

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    model = qwen25vl_3b().cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lm_params = sum(p.numel() for n, p in model.named_parameters() if "visual" not in n)
    layers, d, T, B = 36, 2048, args.tokens, args.rows
    attention = 12 * layers * d * T * T * B  # forward + backward of QK^T and AV
    rows = [ScoreRow(torch.randint(0, 151_000, (T,)).tolist(), None, None, tuple(range(1, T))) for _ in range(B)]
    head = model.get_output_embeddings().weight

    def learner_pass() -> None:
        hidden = torch.cat(hidden_at(model, rows, token_budget=B * T))
        targets = torch.randint(0, 151_000, (hidden.shape[0],), device="cuda")
        teacher = TeacherTargets("hidden", hidden=hidden.detach())
        loss, _ = token_losses(hidden, head, teacher, targets, DivergenceSpec("forward"), 151_665, head.detach())
        loss.sum().backward()

    def teacher_pass() -> None:
        with torch.no_grad():
            hidden_at(model, rows, token_budget=B * T)

    out = []
    passes = [("learner (fwd+bwd, hidden loss)", learner_pass, 6 * lm_params * T * B + attention),
              ("teacher (fwd, hidden payload)", teacher_pass, 2 * lm_params * T * B + attention / 3)]  # fmt: skip
    for label, fn, flops in passes:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        tflops = flops / best / 1e12
        out.append([label, f"{B * T / best:,.0f}", f"{tflops:.0f}", f"{100 * tflops / peak:.1f}%" if peak else "?"])
    mem = torch.cuda.max_memory_allocated() / 2**30
    table(f"{name}: Qwen2.5-VL-3B language model ({lm_params / 1e9:.2f} B params), bf16, {B} x {T} tokens, "
          f"peak memory {mem:.1f} GiB; share of the {peak} TFLOP/s bf16 dense peak",
          ["pass", "tokens/s", "TFLOP/s", "of peak (MFU)"], out)  # fmt: skip


if __name__ == "__main__":
    main()
