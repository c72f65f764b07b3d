"""sample: models/ema.pt -> samples/ (PNGs, samples.npy, grid.png, strip.png, info.json)."""

from stages._cli import run
from vdm.core.params import load_params
from vdm.core.registry import check_params
from vdm.core.runtime import resolve_device
from vdm.model.checkpoint import load_model
from vdm.sampling.sprites import generate, write_samples
from vdm.sampling.steps import SAMPLERS


def main() -> None:
    params = load_params()
    check_params(params, SAMPLERS)
    sp = params.sample
    device = resolve_device(sp.device, "sample.device")
    model, config = load_model("models", "ema", device, sp.precision)
    samples, strip, seconds = generate(
        model, sp.count, sp.options, sp.seed, device, sp.strip_rows, sp.strip_points, progress=True
    )
    info = {
        "count": sp.count,
        **sp.options.model_dump(exclude={"batch_size"}),
        "seconds": round(seconds, 1),
        "img_per_s": round(sp.count / seconds, 4),
        "device": str(device),
        "precision": str(model.net_dtype).removeprefix("torch."),
    }
    write_samples("samples", samples, strip, info)
    print(
        f"sample: {sp.count} sprites, {sp.sampler} with {sp.steps} steps (spacing {sp.spacing}), in {seconds:.0f} s "
        f"({info['img_per_s']:.3f} img/s on {device}, {info['precision']}) -> samples/"
    )


if __name__ == "__main__":
    run(main, __doc__)
