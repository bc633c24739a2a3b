"""One DeepSpeed update on fixed micro-batches, for test_train's 2 processes x 1 step == 1 process x 2 steps.

    torchrun --nproc_per_node N tests/ds_worker.py ACCUM OUT    (N x ACCUM must be 2)
Rank r takes micro-batches [r*ACCUM, (r+1)*ACCUM) of the same two fixed batches; rank 0 saves weights and loss.
"""
import sys

import torch

from rsb import distributed, engine
from rsb.config import Recipe, Resolved, Train
from rsb.training import create_loss, create_model, create_optimizer


def main(accum: int, out: str) -> None:
    rank, _, world = distributed.init()
    torch.set_num_threads(1)
    recipe = Recipe(epochs=10, img_size=32, test_img_size=32, crop_pct=0.95, batch_size=16, opt="lamb", lr=5e-3,
                    weight_decay=0.02, sched="cosine", warmup_epochs=0, warmup_lr=1e-4, min_lr=1e-6, bce_loss=True,
                    bce_target_thresh=0.2, smoothing=0.0, drop_path=0.0, aug_repeats=0, aa="rand-m6-mstd0.5-inc1",
                    mixup=0.1, cutmix=1.0, reprob=0.0, hflip=0.5, model_ema=False, amp=False)
    r = Resolved(arch="test_resnet", recipe_name="a3", recipe=recipe, epochs=10, warmup_epochs=0, img_size=32,
                 test_img_size=32, batch_size=16, lr=5e-3, micro_batch=8, grad_accum=accum, world_size=world,
                 train=Train(precision="fp32", channels_last=False))
    torch.manual_seed(0)
    model = create_model(r, 20)
    eng = distributed.initialize(model, create_optimizer(model, r), r)
    step = engine.Step(engine=eng, loss_fn=create_loss(r), mixup_fn=None, scheduler=None,
                       device=torch.device("cpu"), dtype=None, channels_last=False)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, 32, 32, generator=g)
    targets = torch.softmax(torch.randn(16, 20, generator=g) * 3, dim=1)  # soft targets, as Mixup makes
    losses = []
    for k in range(rank * accum, (rank + 1) * accum):
        losses.append(engine.forward_backward(step, images[8 * k:8 * (k + 1)], targets[8 * k:8 * (k + 1)]))
    loss = torch.stack(losses).mean()
    torch.distributed.all_reduce(loss)
    if rank == 0:
        torch.save({"loss": loss.item() / world,
                    "params": {n: p.detach().clone() for n, p in eng.module.named_parameters()}}, out)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
