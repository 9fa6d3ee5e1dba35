"""A preview projection that raises: handed to a device pool, it fails on rank 0 only (the one that previews), as an
out-of-memory error on a GPU shared with ComfyUI would. Its own module, so pool workers can unpickle it."""


class FailingPreview:
    def __call__(self, features):
        raise RuntimeError("preview failed on rank 0 only")
