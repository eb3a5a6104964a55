"""The output folder: ``layout`` owns its format (every name, folder and metadata key); ``storage`` is
fsspec access with atomic publish; ``units`` is what a worker may do to the folder, ``admin`` what the
launcher does; ``faults`` names the points where tests make a write fail or a process die."""
