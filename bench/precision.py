"""fp32 against bf16 autocast on this CPU: what `precision: auto` should choose (DESIGN.md, issue 12).

    python -m bench.precision        # ~1 min on 2 cores

Training: fwd + bwd + SGD step, batch 32 at 32 px (the mini default's size), channels_last. Inference: batch 16 at
224 px under torch.inference_mode. Two warm-up steps, then img/s over four. Prints the CPU's bf16 flags and what
`auto_precision()` picks here.
"""

from __future__ import annotations

import time

import timm
import torch

from rsb.hardware import NATIVE_BF16_FLAGS, auto_precision, cpu_flags


def rate(arch: str, size: int, train: bool, dtype: torch.dtype | None, steps: int = 4) -> float:
    model = timm.create_model(arch, num_classes=20 if train else 1000).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batch = 32 if train else 16
    x = torch.randn(batch, 3, size, size).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 20, (batch,))
    model.train(train)

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            if not train:
                with torch.inference_mode():
                    model(x)
                return
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    flags = cpu_flags()
    print(
        f"native bf16 flags: {sorted(f for f in flags if f in NATIVE_BF16_FLAGS) or 'none'}; "
        f"auto -> {auto_precision()}; torch threads {torch.get_num_threads()}"
    )
    for arch in ("resnet18", "resnet50"):
        for size, train in ((32, True), (224, False)):
            fp32, bf16 = rate(arch, size, train, None), rate(arch, size, train, torch.bfloat16)
            print(
                f"{arch:9s} {'train' if train else 'infer'} {size:3d}px  fp32 {fp32:6.1f}  bf16 {bf16:6.1f} img/s"
                f"  (bf16/fp32 {bf16 / fp32:.2f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
