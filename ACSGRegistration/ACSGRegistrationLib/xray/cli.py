"""The command line of the CT to X-ray method (ProST): xray-example, xray-register, xray-train, xray-evaluate."""

import json

from ..batch import short_name
from ..cli_options import (BATCH, COUNT, DEVICE_HELP, DRR_EVALUATIONS, INPUT_FILE, INPUT_IMAGE, POSE_STEPS, POSITIVE,
                           SEED_HELP, THREADS_HELP, add_command, choices, number, stop_requests)
from ..errors import InputError
from . import POSE_SEARCH_METHODS as XRAY_METHODS


def cmd_xray_register(args):
    from ..registrar import choose_device
    from .pipeline import register_files, truth_summary
    device = choose_device(args.device)
    done = register_files(args.ct, args.xray, args.init, args.out, args.geometry, args.ct_seg, args.label,
                          args.method, args.evaluations, args.refine_steps, args.detector_pixels, args.ct_spacing,
                          device=device, seed=args.seed, prost_model=args.prost_model,
                          depth_prior_mm=args.depth_prior_mm, true_pose_path=args.true_pose)
    m = done["metrics"]
    views = f", {m['views']} views" if m["views"] > 1 else ""
    print(f"gradient NCC {m['initial_similarity']:.3f} -> {m['final_similarity']:.3f} in {m['seconds']:.1f} s "
          f"({m['evaluations']} DRRs, {m['polarity']}{views})")
    if "truth" in m:
        print(f"error against {args.true_pose}: {truth_summary(m['truth'])}")
    for key, path in done["paths"].items():
        print(f"  {key}: {path}")
    return 0


def cmd_xray_example(args):
    from ..cli_options import copyable_command
    from .example import write_example
    done = write_example(args.ct, args.ct_seg, args.label, args.out, views=args.views, offset_deg=args.offset_deg,
                         offset_mm=args.offset_mm, detector_pixels=args.detector_pixels, seed=args.seed)
    print(f"wrote {args.out}:")
    for key, path in done["paths"].items():
        print(f"  {key}: {path}")
    print(f"the initial pose is {args.offset_deg:g} deg and {args.offset_mm:g} mm off the true one: the target "
          f"{done['initial_mtre_mm']:.1f} mm off on average (mTRE)")
    print("next, register it (it prints its progress; then see overlay.png and the error against the truth):")
    print("  " + copyable_command(done["xray_register"]))
    return 0


def cmd_xray_train(args):
    from .prost import ProSTConfig
    from .prost_training import ProSTTrainConfig, ProSTTrainer, subjects_from_arguments
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    net_config = ProSTConfig(detector_pixels=args.detector_pixels)
    config = ProSTTrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                              rotation_deg=args.start_deg, translation_mm=args.start_mm, depth_mm=args.start_depth_mm,
                              validate_every=args.validate_every, seed=args.seed)
    subjects = subjects_from_arguments(args.ct, args.ct_seg, args.label, net_config, config.simulation_spacing_mm)
    held_out = subjects_from_arguments(args.val_ct or [], args.val_ct_seg or [], args.val_label or [], net_config,
                                       config.simulation_spacing_mm, option="--val-ct")
    trainer = ProSTTrainer(subjects, args.out, config, net_config, validation_subjects=held_out,
                           resume=not args.restart)
    summary = trainer.train(should_stop=stop_requests())
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0 if summary["status"] == "finished" else 130


def cmd_xray_evaluate(args):
    from ..io import read_image
    from .evaluation import BINS, evaluate_subject, write_report
    from .prost import load_prost
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    from .prost_training import check_ct_targets
    from ..outputs import check_target
    from .evaluation import REPORT_KIND
    check_target(args.out, args.ct + args.ct_seg, kind=REPORT_KIND)  # before the work, not after it
    check_ct_targets(args.ct, args.ct_seg, args.label)
    methods = choices("--methods", args.methods, XRAY_METHODS, empty_ok=True)
    from ..resources import model_labels
    models = [(label, load_prost(m)["net"]) for m, label in zip(args.prost_model or [], model_labels(
        args.prost_model or []))]
    if any(m.startswith("prost") for m in methods) and not models:
        raise InputError("the prost methods need --prost-model")
    budgets = {"cmaes+gradient": {"evaluations": args.evaluations, "refine_steps": 40},
               "cmaes": {"evaluations": args.evaluations}, "gradient": {"refine_steps": 100},
               "prost+cmaes+gradient": {"evaluations": 300, "refine_steps": 40}, "prost": {}}
    regions = choices("--regions", args.regions, ("vertebra", "image"))
    specs = {}
    for method in methods:
        for model_name, net in (models if method.startswith("prost") else [(None, None)]):
            for region in regions:
                name = f"{method} [{model_name}]" if len(models) > 1 and model_name else method
                name += " (whole image)" if region == "image" else ""
                specs[name] = {"method": method, "learned": net, "region": region, **budgets[method]}
                if args.depth_prior_mm is not None:
                    specs[name]["depth_prior_mm"] = args.depth_prior_mm
    bins = BINS[:args.bins]
    rows = []
    for ct_path, seg_path, label in zip(args.ct, args.ct_seg, args.label):
        rows += evaluate_subject(short_name(ct_path), read_image(ct_path, "CT"), read_image(seg_path, "CT label map"),
                                 label, specs, args.cases, seed=args.seed, bins=bins, should_stop=stop_requests(),
                                 views=args.views)
        paths = write_report(rows, args.out)  # after each CT: a long run's results so far
    with open(paths["table"]) as fh:
        print(fh.read())
    return 0


# The target of the examples in the help: the shared data's TotalSegmentator example CT and its L1.
EXAMPLE_TARGET = ("--ct ../shared/data/ct/totalsegmentator-example/ct.nii.gz \\\n"
                  "    --ct-seg ../shared/data/ct/totalsegmentator-example/seg.nii.gz --label 31")

# xray-register on what xray-example's example writes: both examples run as they are, one after the other.
EXAMPLE_REGISTRATION = (f"acsgreg xray-register {EXAMPLE_TARGET} \\\n"
                        "    --xray out/xray-example/xray.png --geometry out/xray-example/GEOMETRY.json \\\n"
                        "    --init out/xray-example/POSE.json --true-pose out/xray-example/TRUE_POSE.json \\\n"
                        "    --out out/xray-example-registered")


def add_commands(sub):
    """The CT to X-ray method's subcommands, each with its options, help and an example."""
    def ct_targets(p, what):
        """CTs with their label maps and target vertebrae, each option repeated once per CT, in order."""
        p.add_argument("--ct", action="append", required=True, type=INPUT_IMAGE, help=f"{what} (repeat for several)")
        p.add_argument("--ct-seg", action="append", required=True, type=INPUT_IMAGE,
                       help="its label map (one per --ct, same order)")
        p.add_argument("--label", action="append", type=int, required=True,
                       help="its target vertebra's label value (one per --ct)")

    p = add_command(sub, "xray-example", "a worked example for xray-register: a realistic X-ray simulated from "
                                         "a CT at a known pose, its GEOMETRY.json, an initial POSE.json off the "
                                         "truth and the truth (TRUE_POSE.json)",
                    f"acsgreg xray-example {EXAMPLE_TARGET} \\\n"
                    "    --out out/xray-example\n" + EXAMPLE_REGISTRATION)
    p.add_argument("--ct", required=True, type=INPUT_IMAGE, help="CT in Hounsfield units (any format SimpleITK reads)")
    p.add_argument("--ct-seg", required=True, type=INPUT_IMAGE,
                   help="the CT's label map: the X-ray looks at the target vertebra, and its neighbours move "
                        "slightly (the patient is not lying as in the CT)")
    p.add_argument("--label", type=int, help="the target's label value in --ct-seg (may be omitted with one label)")
    p.add_argument("--out", required=True,
                   help="folder for xray.png, GEOMETRY.json, POSE.json, TRUE_POSE.json (with --views 2 also "
                        "xray_2.png, GEOMETRY_2.json, POSE_2.json)")
    p.add_argument("--views", type=int, choices=(1, 2), default=1,
                   help="1 (default): an AP X-ray; 2: and a lateral one beside it (the C-arm turned 90 deg, the "
                        "patient unmoved), to register together")
    p.add_argument("--offset-deg", type=number(float, minimum=0.0, maximum=45.0), default=5.0,
                   help="the initial pose's rotation off the truth, about a random axis through the target "
                        "(default 5)")
    p.add_argument("--offset-mm", type=number(float, minimum=0.0, maximum=100.0), default=15.0,
                   help="its translation off the truth, in a random direction (default 15: where a C-arm's "
                        "nominal pose leaves a registration to start)")
    p.add_argument("--detector-pixels", type=number(int, minimum=16, maximum=2048), default=256,
                   help="pixels a side of the simulated detector, 205 mm across at 1,020 mm from the source "
                        "(default 256: 0.8 mm pixels)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random draws (the view, the offset's directions, "
                                                      "the X-ray's noise and shutters; default 0)")
    p.set_defaults(func=cmd_xray_example)

    summary = ("CT to X-ray pose registration (ProST's intensity-based baseline: gradient NCC, CMA-ES then gradient "
               "ascent)")
    p = add_command(sub, "xray-register", summary, EXAMPLE_REGISTRATION,
                    description=summary[:1].upper() + summary[1:] + ". The example registers what xray-example's "
                                "example writes (a simulated X-ray and its true pose); with an X-ray of your own, "
                                "give it and its initial pose (--xray xray.dcm --init POSE.json), without --true-pose.")
    p.add_argument("--ct", required=True, type=INPUT_IMAGE, help="CT in Hounsfield units (any format SimpleITK reads)")
    p.add_argument("--ct-seg", type=INPUT_IMAGE,
                   help="the CT's label map: the target vertebra's centroid is the pose's pivot (default: none, "
                        "the CT's centre and the whole X-ray)")
    p.add_argument("--label", type=int, help="the target's label value in --ct-seg (may be omitted with one label)")
    p.add_argument("--xray", required=True, action="append", type=INPUT_IMAGE,
                   help="2D X-ray: PNG/TIFF/NIfTI/MHA, or DICOM XA/RF/DX/CR; repeat for more views of the patient "
                        "(e.g. AP and lateral), registered together: a second view pins down the depth one view "
                        "cannot see")
    p.add_argument("--geometry", action="append", type=INPUT_FILE,
                   help="GEOMETRY.json: source_to_detector_mm, pixel_spacing_mm [sx, sy], size, principal_point_px; "
                        "DICOM tags fill in what it omits; once for all views or once per --xray (default: the "
                        "DICOM tags alone)")
    p.add_argument("--init", required=True, action="append", type=INPUT_FILE,
                   help="POSE.json {\"ct_to_source\": 4x4}: the initial pose; one per --xray, in the same order "
                        "(their differences are the C-arm's motion between the shots, kept fixed)")
    p.add_argument("--out", required=True, help="folder for pose.json, drr.nii.gz, overlay.png, metrics.json "
                                                "(the second view's: pose_2.json, ...)")
    p.add_argument("--true-pose", type=INPUT_FILE,
                   help="TRUE_POSE.json {\"ct_to_source\": 4x4}: a simulated X-ray's true pose (xray-example "
                        "writes it; the first view's): metrics.json and the summary add the error against it at "
                        "the initial and the final pose, over the target (needs --ct-seg; default: none)")
    p.add_argument("--method", choices=XRAY_METHODS, default=XRAY_METHODS[0],
                   help=f"the pose search: {', '.join(XRAY_METHODS)} (default {XRAY_METHODS[0]}; the prost methods "
                        f"start from ProST's learned similarity)")
    p.add_argument("--prost-model", type=INPUT_FILE,
                   help="ProST model for the prost methods (default: the shipped one)")
    p.add_argument("--evaluations", type=DRR_EVALUATIONS, default=400,
                   help="DRRs per CMA-ES run (two runs: from the initial pose twice, or from ProST's answer and "
                        "the initial pose; default 400)")
    p.add_argument("--refine-steps", type=POSE_STEPS, default=60, help="gradient-ascent steps (default 60)")
    p.add_argument("--depth-prior-mm", type=POSITIVE, default=None,
                   help="one view: how far (mm) the search may move the CT along the ray from the initial pose "
                        "before its prior weighs (default 60: the C-arm's source-to-patient distance known within "
                        "a few cm; narrower where it is known better)")
    p.add_argument("--detector-pixels", type=number(int, minimum=8, maximum=512), default=96,
                   help="longest side of the registration's detector grid (default 96)")
    p.add_argument("--ct-spacing", type=number(float, minimum=0.5, maximum=8.0), default=2.0,
                   help="the CT is resampled to this spacing in mm when finer (default 2)")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_xray_register)

    p = add_command(sub, "xray-train", "train ProST's learned similarity on simulated X-rays of CTs (the "
                                       "direction of its pose gradient supervised: double backward)",
                    f"acsgreg xray-train {EXAMPLE_TARGET} \\\n"
                    "    --steps 100 --out runs/prost")
    ct_targets(p, "a training CT")
    p.add_argument("--val-ct", action="append", type=INPUT_IMAGE,
                   help="a held-out CT for validation (default: new poses of the training CTs)")
    p.add_argument("--val-ct-seg", action="append", type=INPUT_IMAGE, help="its label map (one per --val-ct)")
    p.add_argument("--val-label", action="append", type=int, help="its target's label value (one per --val-ct)")
    p.add_argument("--out", required=True, help="run folder: last.pt (resumed from), model.pt, history.csv")
    p.add_argument("--steps", type=COUNT, default=3000, help="optimisation steps (default 3000)")
    p.add_argument("--batch-size", type=BATCH, default=4, help="simulated X-rays per step (default 4)")
    p.add_argument("--learning-rate", type=number(float, above=0.0, maximum=1.0), default=1e-3,
                   help="Adam learning rate (default 0.001)")
    p.add_argument("--start-deg", type=number(float, above=0.0, maximum=90.0), default=10.0,
                   help="σ of the training start poses' rotation offsets per axis (default 10)")
    p.add_argument("--start-mm", type=number(float, above=0.0, maximum=200.0), default=15.0,
                   help="σ of their in-plane translation offsets (default 15)")
    p.add_argument("--start-depth-mm", type=number(float, above=0.0, maximum=400.0), default=30.0,
                   help="σ of their depth offsets (default 30)")
    p.add_argument("--detector-pixels", type=number(int, minimum=8, maximum=256), default=64,
                   help="the network's detector (default 64)")
    p.add_argument("--validate-every", type=COUNT, default=100,
                   help="validate (and print) every this many steps (default 100)")
    p.add_argument("--threads", type=COUNT, help=THREADS_HELP)
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.add_argument("--restart", action="store_true", help="start afresh even if --out holds a run")
    p.set_defaults(func=cmd_xray_train)

    p = add_command(sub, "xray-evaluate", "CT to X-ray registration in simulation: realistic X-rays of test CTs "
                                          "at known poses, starts binned by mTRE, every method on the same cases",
                    f"acsgreg xray-evaluate {EXAMPLE_TARGET} \\\n"
                    "    --methods cmaes+gradient --cases 2 --bins 2 --out out/xray-study")
    ct_targets(p, "a test CT")
    p.add_argument("--prost-model", action="append", type=INPUT_FILE,
                   help="a ProST model (repeat to compare several; needed by the prost methods)")
    p.add_argument("--methods", default="prost+cmaes+gradient,cmaes+gradient,gradient",
                   help=f"comma-separated, from {', '.join(XRAY_METHODS)} (default "
                        f"prost+cmaes+gradient,cmaes+gradient,gradient)")
    p.add_argument("--cases", type=COUNT, default=5, help="cases per start bin and CT (default 5)")
    p.add_argument("--bins", type=COUNT, default=4,
                   help="how many of the bins 0-10, 10-20, 20-40, 40-60 mm (default 4: all)")
    p.add_argument("--evaluations", type=DRR_EVALUATIONS, default=400,
                   help="CMA-ES's DRRs per run (two runs) without ProST (default 400); with ProST 300 per run")
    p.add_argument("--regions", default="vertebra",
                   help="where the intensity similarity compares the images, comma-separated: vertebra (around the "
                        "target's projection, as xray-register does with a label map; default), image (the whole "
                        "X-ray, as without one)")
    p.add_argument("--out", required=True, help="folder for cases.csv, summary.csv, summary.md")
    p.add_argument("--threads", type=COUNT, help=THREADS_HELP)
    p.add_argument("--views", type=int, choices=(1, 2), default=1,
                   help="1 (default): one AP X-ray; 2: a lateral X-ray beside each AP one, registered together "
                        "(the patient unmoved, the C-arm turned 90 deg); errors of the AP view")
    p.add_argument("--depth-prior-mm", type=POSITIVE, default=None,
                   help="one view: the width of the prior on depth along the ray (xray-register's option; default 60)")
    p.add_argument("--seed", type=int, default=0, help=SEED_HELP)
    p.set_defaults(func=cmd_xray_evaluate)
