"""Folders of model files that requests name by file stem (A1111's ``models/Lora``,
``models/ESRGAN``, ComfyUI's ``models/upscale_models`` ...): the CLI's ``--upscaler-dir`` and the
server's ``--lora-dir``, ``--controlnet-dir``, ``--vae-dir`` ... No torch here."""
import os


def file_stem(name):
    """A file name's stem, its folders written either way (ComfyUI on Windows writes
    "a\\b.safetensors"): what requests name model files by."""
    return os.path.splitext(os.path.basename(str(name).replace("\\", "/")))[0]


def by_name(root, model_folders=False, suffixes=(".safetensors",)):
    """{name: path} of the ``.safetensors`` files (or those of ``suffixes``) under ``root``
    (None: none), searched recursively in sorted order, each named by its stem, the first of a
    name kept; with ``model_folders``, also each folder below ``root`` holding a
    ``config.json`` (a diffusers model, named by the folder, not searched further)."""
    found = {}
    if root is None:
        return found
    for folder, dirs, names in sorted(os.walk(root)):
        dirs.sort()
        if model_folders and "config.json" in names and folder != root:
            found.setdefault(os.path.basename(folder), folder)
            dirs[:] = []
            continue
        for n in sorted(names):
            stem, ext = os.path.splitext(n)
            if ext.lower() in suffixes:
                found.setdefault(stem, os.path.join(folder, n))
    return found
