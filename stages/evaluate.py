"""evaluate: models/, samples/, data/processed -> metrics/eval.json, eval/ (closest_pairs.png, grid-filtered.png)."""

from stages._cli import run
from vdm.core.params import load_params
from vdm.evaluation.evaluate import evaluate


def main() -> None:
    ep = load_params().evaluate
    r = evaluate(ep)
    fid = f"FID {r['fid']:.1f}" if r["fid"] is not None else "FID/KID/IS skipped (no Inception weights)"
    scaled = r["test_bpd_eps_scaled"]
    scaled = f", {scaled:.3f} with the eps scale" if scaled is not None else ""
    filtered = (
        f"; filtered to {r['filtered_colours']} colours (not the model's own): "
        + (f"classifier {r['filtered_c2st']:.3f}, " if r.get("filtered_c2st") is not None else "")
        + f"parts {r['filtered_parts']:.2f}, "
        f"palette {r['filtered_palette']:.1f}, flatness {r['filtered_flatness']:.3f}"
        if "filtered_colours" in r
        else ""
    )
    c2st = (
        f"classifier two-sample test {r['c2st']:.3f} +- {r['c2st_se']:.3f} (real against real "
        f"{r['c2st_floor']:.3f} +- {r['c2st_floor_se']:.3f}; 0.5 = indistinguishable)"
        if r["c2st"] is not None
        else "classifier two-sample test off (evaluate.c2st_repeats = 0)"
        if ep.c2st_repeats == 0
        else f"classifier two-sample test skipped ({r['c2st_images']} samples: it needs at least 4)"
    )
    print(
        f"evaluate: {c2st}; "
        f"test {r['test_bpd']:.3f} +- {r['test_bpd_se']:.3f} bits/dim (EMA{scaled}); SWD {r['swd']:.1f} +- "
        f"{r['swd_se']:.1f} x1e3 against the test split (real floor {r['swd_floor']:.1f} +- {r['swd_floor_se']:.1f}, "
        f"{r['swd_ratio']:.2f}x); graininess {r['graininess']:.1f} levels (test {r['graininess_test']:.1f}); parts "
        f"{r['parts']:.2f} per sprite (test {r['parts_test']:.2f}), palette {r['palette']:.1f} colours "
        f"(test {r['palette_test']:.1f}), flatness {r['flatness']:.3f} (test {r['flatness_test']:.3f}), main hue "
        f"{r['hue']:.2f} of the coloured pixels (test {r['hue_test']:.2f}); {fid}; "
        f"memorisation ratio median {r['memorisation_median_ratio']:.2f}, copies "
        f"{r['memorisation_copies']:.1%}{filtered}"
    )


if __name__ == "__main__":
    run(main, __doc__)
