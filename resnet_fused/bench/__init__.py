"""App code, not the library: ``resnet-fused bench`` (``models``: whole networks against eager
and torch.compile; ``layers``: one conv unit at a time; ``timing``: the shared timing
primitives). Nothing in the library imports this package."""
