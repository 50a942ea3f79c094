"""Test families whose images depend on the batch they are drawn in, as a batched network's rounding can
(imported by subprocesses as `batch_dependent_family:BatchDependentPix`)."""
import torch

from neon.testing import TinyPixFamily


def company_offset(seeds) -> int:
    """A shift of every pixel that depends on which seeds share the batch (and on nothing else)."""
    return (sum(int(s) for s in seeds) * 37 + len(seeds)) % 5 + 1


class BatchDependentPix(TinyPixFamily):
    """tinypix plus a per-batch shift: the images change with the batch composition."""
    name = "batch-dependent-pix"

    def sample(self, bundle, seeds, labels=None, **sampler_args):
        images = super().sample(bundle, seeds, labels, **sampler_args)
        return images + company_offset(seeds)     # uint8 arithmetic wraps: every value moves


class BatchDependentPixWithMode(BatchDependentPix):
    """The same, with its own batch-invariant arithmetic: `batch_invariant=True` shifts each image as if alone."""
    name = "batch-dependent-pix-with-mode"
    calls = 0

    def sample(self, bundle, seeds, labels=None, batch_invariant=False, **sampler_args):
        type(self).calls += 1
        images = TinyPixFamily.sample(self, bundle, seeds, labels, **sampler_args)
        if not batch_invariant:
            return images + company_offset(seeds)
        return images + torch.tensor([company_offset([s]) for s in seeds], dtype=torch.uint8)[:, None, None, None]
