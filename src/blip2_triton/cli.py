"""`blip2-triton`: serve the BLIP-2 model repository, or write the tiny test checkpoint."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from pathlib import Path

from .options import DEVICES, DTYPES, QUANTIZATIONS
from .supervisor.settings import INSTANCE_KINDS

STAGE_FLAGS = ("dtype", "device", "quantization")


def _absolute_if_local(model_id: str) -> str:
    # Stage processes do not run in the caller's directory: relative checkpoint paths must not reach them.
    path = Path(model_id).expanduser()
    return str(path.resolve()) if model_id and path.exists() else model_id


def _serve(args: argparse.Namespace) -> int:
    from .supervisor import LaunchSettings, serve

    given = {k: v for k, v in vars(args).items() if k not in ("command", "func")}
    base = LaunchSettings.from_env(os.environ)
    options = {**base.options, **{k: given.pop(k) for k in STAGE_FLAGS if k in given}}
    extra_args = base.extra_args + tuple(given.pop("triton_args", ()))
    front = {"openai_port": given.pop("openai_port")} if "openai_port" in given else {}
    if "log_format" in given:
        from .logs import configure_logging

        options["log_format"] = front["log_format"] = given.pop("log_format")
        configure_logging(options["log_format"])
    return serve(dataclasses.replace(base, **given, options=options, extra_args=extra_args), front=front)


def _tiny_model(args: argparse.Namespace) -> int:
    from .checkpoint import write_tiny

    print(write_tiny(args.out_dir, args.family, seed=args.seed))
    return 0


def _scene(args: argparse.Namespace) -> int:
    from .scenes import make_scene, random_held_out_seed, save_scene

    seed = args.seed if args.seed is not None else random_held_out_seed()
    scene = make_scene(seed)
    save_scene(scene, args.out, scale=args.scale)
    print(f"{args.out}: seed {seed}")
    print(f"caption: {scene.caption}")
    for question, answer in scene.qa:
        print(f"{question} {answer}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="blip2-triton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    # Unset flags stay out of the namespace: defaults come from the environment, else LaunchSettings.
    serve = sub.add_parser("serve", help="start tritonserver on the BLIP-2 model repository",
                           argument_default=argparse.SUPPRESS,
                           epilog="Defaults: the environment variables of README's options table.")
    serve.add_argument("--model-id", type=_absolute_if_local,
                       help="HF repo id or local checkpoint dir (default: BLIP2_MODEL_ID, else the tiny model)")
    serve.add_argument("--t5", dest="with_t5", action="store_true",
                       help="also serve the FlanT5 ensemble `blip2_t5` (default: the embedded tiny FlanT5 model)")
    serve.add_argument("--t5-model-id", type=_absolute_if_local,
                       help="FlanT5 BLIP-2 checkpoint for `blip2_t5` (implies --t5)")
    serve.add_argument("--itm", dest="with_itm", action="store_true",
                       help="also serve image-text retrieval and matching (`blip2_embed_image`, `blip2_embed_text`, "
                            "`blip2_similarity`, `blip2_match`; default: the embedded tiny retrieval checkpoint)")
    serve.add_argument("--itm-model-id", type=_absolute_if_local,
                       help="retrieval checkpoint (Blip2ForImageTextRetrieval, e.g. Salesforce/blip2-itm-vit-g) for "
                            "the retrieval models (implies --itm; default: BLIP2_ITM_MODEL_ID)")
    serve.add_argument("--dtype", choices=DTYPES)
    serve.add_argument("--device", help=f"{', '.join(DEVICES)} or cuda:N (KIND_GPU instances use Triton's GPU)")
    serve.add_argument("--quantization", choices=QUANTIZATIONS)
    serve.add_argument("--instance-kind", choices=INSTANCE_KINDS,
                       help="gpu: the computing stages' KIND_GPU configs, one vision instance per GPU "
                            "(default: BLIP2_INSTANCE_KIND, else cpu)")
    serve.add_argument("--http-port", type=int)
    serve.add_argument("--grpc-port", type=int)
    serve.add_argument("--metrics-port", type=int)
    serve.add_argument("--host", help="address the ports clients reach bind to (default: 127.0.0.1; the container "
                       "image sets 0.0.0.0)")
    serve.add_argument("--no-front", dest="front", action="store_false",
                       help="clients reach Triton directly: no request limits, OpenAI API or honest readiness")
    serve.add_argument("--log-format", choices=("text", "json"),
                       help="log lines of the stages, the front and this supervisor (Triton's own stay text)")
    serve.add_argument("--openai-port", type=int,
                       help="a second public HTTP port with the same routes, e.g. for OpenAI clients (front)")
    serve.add_argument("--model-repository", type=Path)
    serve.add_argument("--exit-timeout-secs", dest="exit_timeout_s", type=int)
    serve.add_argument("--startup-timeout-s", type=float)
    serve.add_argument("--max-restarts", type=int,
                       help="restart tritonserver when it or a stage's stub process dies, at most this many times "
                            "within --restart-window-s (default 0: exit with an error, the orchestrator restarts)")
    serve.add_argument("--restart-window-s", type=float)
    serve.add_argument("--no-watchdog", dest="watchdog", action="store_false",
                       help="do not watch the stage stub processes (a dead stub then fails requests until restart)")
    serve.add_argument("triton_args", nargs="*", help="extra tritonserver arguments, after `--`")
    serve.set_defaults(func=_serve)
    tiny = sub.add_parser("tiny-model", help="write a tiny random-weight BLIP-2 checkpoint (OPT, FlanT5 or "
                                             "image-text retrieval)")
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", choices=("opt", "t5", "itm"), default="opt")
    tiny.add_argument("--seed", type=int, default=1234)
    tiny.set_defaults(func=_tiny_model)
    scene = sub.add_parser("scene", help="draw a scene the embedded default model knows (shapes, colours, positions "
                                         "on a plain background) and print its caption, questions and answers")
    scene.add_argument("out", help="image file to write (PNG, JPEG, ...)")
    scene.add_argument("--seed", type=int, default=None, help="scene seed (default: a random one the model never "
                                                              "saw in training)")
    scene.add_argument("--scale", type=int, default=8, help="pixels per pixel of the 48 px scene, for viewing "
                                                           "(the server resizes it back)")
    scene.set_defaults(func=_scene)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
