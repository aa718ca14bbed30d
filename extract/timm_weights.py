"""Where a `timm:<model>` backbone's weights come from: `--weights FILE`, or `imagenet` = the file in
timm's local caches (Hugging Face hub cache, or torch hub's for URL weights), which timm downloads
there itself (as `pretrained=True` does) when it is missing and the machine is online; $HF_HUB_OFFLINE
or `msdn extract --offline` forbid the download, and so does download=False (`msdn predict`)."""
from __future__ import annotations

from pathlib import Path

import torch

from extract.backbone_weights import OFFLINE_ENV, BackboneWeightsError, offline, unreachable

TIMM_PREFIX = "timm:"
INSTALL_HINT = 'pip install "msdn-zsl[timm]"'


def model_name(backbone: str) -> str:
    """timm:<model> -> <model>."""
    return backbone[len(TIMM_PREFIX):]


def import_timm(backbone: str, error=ValueError):
    try:
        import timm
        import timm.data  # noqa: F401
    except ImportError as err:
        raise error(f"{backbone}: timm backbones need the timm package, which is not installed "
                    f"({INSTALL_HINT})") from err
    return timm


def cached_weights(model: str) -> tuple[Path | None, str]:
    """(file in timm's local caches or None, where it was looked for)."""
    timm = import_timm(TIMM_PREFIX + model, BackboneWeightsError)
    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None:
        return None, "timm has no pretrained weights for it"
    places = []
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import constants, try_to_load_from_cache
        except ImportError:
            constants = None
        if constants is not None:
            repo, _, revision = cfg.hf_hub_id.partition("@")
            for filename in ([cfg.hf_hub_filename] if cfg.hf_hub_filename else
                             ["model.safetensors", "pytorch_model.bin"]):
                found = try_to_load_from_cache(repo, filename, cache_dir=constants.HF_HUB_CACHE,
                                               revision=revision or None)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found), ""
            places.append(f"Hugging Face cache {constants.HF_HUB_CACHE} for {repo}")
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / cfg.url.rsplit("/", 1)[-1]
        if path.is_file():
            return path, ""
        places.append(str(path))
    return None, "looked in " + " and ".join(places) if places else "no download source known"


def resolve_weights(spec, download: bool | None = None) -> Path | None:
    """The weights file `spec` asks for (None for random init): a cached file, else (download None:
    unless offline; False: never) timm's own download into its cache; BackboneWeightsError in one
    line when neither gives one."""
    model = model_name(spec.name)
    import_timm(spec.name, BackboneWeightsError)
    if spec.weights == "random":
        return None
    if spec.weights == "imagenet":
        path, where = cached_weights(model)
        if path is None:
            allowed = not offline() if download is None else download
            why = _download(model) if allowed else \
                f"downloads are off (${OFFLINE_ENV} or --offline)" if download is None else "this command never downloads"
            path, where = cached_weights(model) if not why else (None, where)
            if path is None:
                raise BackboneWeightsError(
                    f"{spec.name}: no pretrained weights for timm model {model!r} on this machine ({where}); "
                    f"{why or 'the download left no file there'}: pass --weights FILE (a state dict or "
                    f".safetensors file of {model}), or fill timm's cache on a machine with internet "
                    f"(python -c \"import timm; timm.create_model('{model}', pretrained=True)\")")
        return path.resolve()
    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(f"{path}: weights file not found (for backbone {spec.name})")
    return path.resolve()


def _download(model: str) -> str:
    """timm's own download of `model`'s pretrained weights into its cache (as pretrained=True does);
    '' when done, else why not, in words."""
    timm = import_timm(TIMM_PREFIX + model, BackboneWeightsError)
    cfg = timm.models.get_pretrained_cfg(model)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return "timm knows no download source for it"
    if cfg.hf_hub_id:
        from huggingface_hub import constants
        source = constants.ENDPOINT
    else:
        source = cfg.url
    problem = unreachable(source)
    if problem:
        return f"download failed: {problem}"
    try:
        timm.create_model(model, pretrained=True)
    except Exception as err:  # noqa: BLE001 - the hub, torch and timm each raise their own types
        return f"download failed ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''})"
    return ""
