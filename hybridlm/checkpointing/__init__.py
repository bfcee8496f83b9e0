"""A training run's checkpoints (docs/design.md §7); converting other formats is `hybridlm.convert`.

- io.py: CheckpointError and the one safe reader (torch.load(weights_only=True)) that every checkpoint file
  hybridlm opens goes through, atomic writes. Free of Lightning, so the conversion package can use it.
- callbacks.py: what Lightning calls during a run: the atomic CheckpointIO plugin, StepCheckpoint, the final
  last.ckpt, and RunStateCallback with the global RNG states that make a resume exact.
- resume.py: which checkpoint a run continues from (resume=auto or resume=<path>) and what it resumes.
"""
