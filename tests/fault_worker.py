"""Run a stage with a fault at a named point, for test_reliability's fault matrix.

    python tests/fault_worker.py POINT MODULE [stage args...]

Kill points send SIGKILL to this very process (what `kill -9` or an OOM killer does): nothing is flushed or cleaned
up. The patches only decide *when*; the stage runs its real code up to that moment.
  mid-epoch        the 3rd update of epoch 2
  checkpoint-write after epoch 2's states file (model + optimizer) is on disk, before rsb.json and `latest`
  between-epochs   right after epoch 1's checkpoint is published, before epoch 2 starts
  evaluation       in the evaluate stage, after val is scored, while V2 is being predicted
  rank1-crash      rank 1 raises at its 3rd micro-step (the other rank is left waiting in an all-reduce)
  rank1-stop       rank 1 stops itself (SIGSTOP) at its 3rd micro-step: alive, silent, never continuing
  evaluate-hang    in the evaluate stage's main process, after the first batch: asleep, outside any loader
  prepare-index    in prepare, once V2's repacked tar is written into the partial folder, before the decode check
Stop signals, sent at rank 0's (or rank 1's) 3rd micro-step, inside an update; the stage must save at the next
update and exit errors.EXIT_STOPPED:
  term-launcher    SIGTERM to the session leader (the test starts the launcher in a session of its own), which
                   forwards it to the ranks
  usr1-rank1       SIGUSR1 to rank 1 alone: rank 0 learns it from the ranks' agreement
  term-twice       SIGTERM to this process, and again while the checkpoint's files are being written
  usr1-step        SIGUSR1 to every process under the stand-in `srun`, as SLURM's `--signal` reaches a job step
A full disk is real too: the process's file-size limit (RLIMIT_FSIZE, FSIZE_LIMIT bytes) is set just before a write,
so the kernel refuses it (EFBIG), as a full disk or quota would (ENOSPC, EDQUOT):
  full-disk-checkpoint  before epoch 2's checkpoint is written
  full-disk-weights     before the final weights file is written
"""

import os
import resource
import runpy
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def limit_file_size() -> None:
    limit = int(os.environ.get("FSIZE_LIMIT", "10000"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def send(point: str) -> None:
    if point == "term-launcher":
        os.kill(os.getsid(0), signal.SIGTERM)
    elif point == "usr1-step":
        import psutil

        step = next(p for p in psutil.Process().parents() if "srun" in " ".join(p.cmdline()))
        for p in step.children(recursive=True):
            p.send_signal(signal.SIGUSR1)
    else:
        os.kill(os.getpid(), signal.SIGTERM if point == "term-twice" else signal.SIGUSR1)


def arm(point: str) -> None:
    from rsb import checkpoint, engine

    calls = {"n": 0}
    if point == "mid-epoch":
        original = engine.train_one_epoch

        def train_one_epoch(s, loader, epoch, *args, **kwargs):
            if epoch == 1:
                inner = s.engine.step

                def step():
                    inner()
                    if s.engine.is_gradient_accumulation_boundary():
                        calls["n"] += 1
                        if calls["n"] == 3:
                            die()

                s.engine.step = step
            return original(s, loader, epoch, *args, **kwargs)

        engine.train_one_epoch = train_one_epoch
    elif point == "checkpoint-write":
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        save = TorchCheckpointEngine.save

        def killing_save(self, state_dict, path):
            save(self, state_dict, path)
            if "epoch2" in str(path):
                die()

        TorchCheckpointEngine.save = killing_save
    elif point == "between-epochs":
        save = checkpoint.save

        def killing_save(engine_, ckpt_dir, tag, *args, **kwargs):
            save(engine_, ckpt_dir, tag, *args, **kwargs)
            if tag == "epoch1":
                die()

        checkpoint.save = killing_save
    elif point == "full-disk-checkpoint":
        save = checkpoint.save

        def limited_save(engine_, ckpt_dir, tag, *args, **kwargs):
            if tag == "epoch2":
                limit_file_size()
            save(engine_, ckpt_dir, tag, *args, **kwargs)

        checkpoint.save = limited_save
    elif point == "full-disk-weights":
        from rsb import trainer

        save_weights = trainer.save_weights

        def limited_save_weights(*args, **kwargs):
            limit_file_size()
            save_weights(*args, **kwargs)

        trainer.save_weights = limited_save_weights
    elif point == "evaluation":  # the stage runs as __main__ and imports `predict` then: patch it at the source
        predict = engine.predict

        def killing_predict(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                die()
            return predict(*args, **kwargs)

        engine.predict = killing_predict
    elif point == "rank1-crash":
        forward_backward = engine.forward_backward

        def crashing(*args, **kwargs):
            calls["n"] += 1
            if os.environ.get("RANK") == "1" and calls["n"] == 3:
                raise RuntimeError("injected fault on this rank")
            return forward_backward(*args, **kwargs)

        engine.forward_backward = crashing
    elif point == "rank1-stop":
        forward_backward = engine.forward_backward

        def stopping(*args, **kwargs):
            calls["n"] += 1
            if os.environ.get("RANK") == "1" and calls["n"] == 3:
                os.kill(os.getpid(), signal.SIGSTOP)
            return forward_backward(*args, **kwargs)

        engine.forward_backward = stopping
    elif point in ("term-launcher", "usr1-rank1", "term-twice", "usr1-step"):
        forward_backward = engine.forward_backward
        rank = "1" if point == "usr1-rank1" else "0"

        def signalling(*args, **kwargs):
            calls["n"] += 1
            if os.environ.get("RANK", "0") == rank and calls["n"] == 3:
                send(point)
            return forward_backward(*args, **kwargs)

        engine.forward_backward = signalling
        if point == "term-twice":
            from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

            write = TorchCheckpointEngine.save

            def signalled_write(self, state_dict, path):
                os.kill(os.getpid(), signal.SIGTERM)  # the second signal, in the middle of the save
                write(self, state_dict, path)

            TorchCheckpointEngine.save = signalled_write
    elif point == "evaluate-hang":
        import time

        predict = engine.predict

        def hanging_predict(model, loader, *args, **kwargs):
            def first_batch_then_hang():
                it = iter(loader)
                yield next(it)
                time.sleep(3600)

            return predict(model, first_batch_then_hang(), *args, **kwargs)

        engine.predict = hanging_predict
    elif point == "prepare-index":
        from rsb.data import archives

        repack = archives.repack_v2

        def killing_repack(*args, **kwargs):
            repack(*args, **kwargs)
            die()

        archives.repack_v2 = killing_repack
    elif point != "none":  # none: the stage as it is (a rerun through the same launcher)
        sys.exit(f"unknown fault point {point!r}")


if __name__ == "__main__":
    # the deepspeed launcher puts --local_rank=N first; the rank is in the environment as well
    point, module, *args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    arm(point)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
