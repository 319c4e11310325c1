"""`blip2` command line: caption images, ask questions, search a folder of images by text, check health.

Exit codes: 0 ok, 1 other error, 2 usage (bad arguments, unreadable image file),
3 invalid input (the server rejected the request), 4 server unavailable / not
ready, 5 deadline exceeded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._errors import Blip2Error, DeadlineExceededError, InvalidInputError, ServerUnavailableError
from ._request import DEFAULT_GRPC_URL
from ._sync import Blip2Client

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_UNAVAILABLE = 4
EXIT_TIMEOUT = 5

_CONTROL_FLAGS: list[tuple[str, str, type]] = [
    ("--max-tokens", "max_tokens", int),
    ("--temperature", "temperature", float),
    ("--top-p", "top_p", float),
    ("--top-k", "top_k", int),
    ("--beam-width", "beam_width", int),
    ("--repetition-penalty", "repetition_penalty", float),
    ("--seed", "seed", int),
]


def exit_code(err: BaseException) -> int:
    if isinstance(err, InvalidInputError):
        return EXIT_INVALID_INPUT
    if isinstance(err, ServerUnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(err, DeadlineExceededError):
        return EXIT_TIMEOUT
    return EXIT_ERROR


def _add_connection_options(p: argparse.ArgumentParser, *, top_level: bool) -> None:
    # The options are accepted before and after the subcommand; the subcommand's
    # copies default to SUPPRESS so they only override when actually given.
    def default(value: Any) -> Any:
        return value if top_level else argparse.SUPPRESS

    url = os.environ.get("BLIP2_URL") or DEFAULT_GRPC_URL
    p.add_argument("--url", default=default(url),
                   help=f"server address (default: $BLIP2_URL, else {DEFAULT_GRPC_URL})")
    p.add_argument(
        "--protocol",
        choices=["grpc", "http"],
        default=default(None),
        help="default grpc, or http when --url starts with http://",
    )
    p.add_argument("--timeout-s", type=float, default=default(60.0), help="per-request deadline (default 60)")
    p.add_argument("--retries", type=int, default=default(0), help="retries when the server is unavailable")
    p.add_argument("--model", default=default("blip2"), help="model name (default blip2)")
    p.add_argument("--json", action="store_true", default=default(False), help="machine-readable output")


def _add_controls(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation controls (server defaults when omitted)")
    for flag, dest, typ in _CONTROL_FLAGS:
        g.add_argument(flag, dest=dest, type=typ, default=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2",
        description="Caption images, answer questions and search images by text with a BLIP-2 Triton server.",
        epilog="exit codes: 0 ok, 1 other error, 2 usage, 3 invalid input, 4 unavailable, 5 timeout",
    )
    _add_connection_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{caption,ask,search,health}")

    p = sub.add_parser("caption", help="caption one or more images ('-' reads stdin)")
    p.add_argument("images", nargs="+", metavar="IMG")
    _add_controls(p)
    _add_connection_options(p, top_level=False)

    p = sub.add_parser("ask", help="ask a question about an image")
    p.add_argument("image", metavar="IMG")
    p.add_argument("question")
    _add_controls(p)
    _add_connection_options(p, top_level=False)

    p = sub.add_parser(
        "search",
        help="rank the images of a folder by similarity to a text (server with retrieval: `serve --itm`)",
        description="Embeds every image under DIR (once: embeddings are cached in a local file keyed by each file's "
        "content and tied to the server's checkpoint), embeds QUERY, and prints the best matches as "
        "`score<TAB>path`, best first.",
    )
    p.add_argument("dir", metavar="DIR", type=Path, help="folder searched recursively (or one image file)")
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--top-k", type=_positive_int, default=10, help="hits printed (default 10)")
    p.add_argument("--rerank", type=_positive_int, default=0, metavar="N",
                   help="re-score the best N with the image-text matching head and order them by P(match)")
    p.add_argument("--cache", type=Path, default=None,
                   help="embedding cache file (default ~/.cache/blip2-client/embeddings/<url>_<model>.npz)")
    p.add_argument("--no-cache", action="store_true", help="embed every image again; read and write no cache")
    _add_connection_options(p, top_level=False)

    p = sub.add_parser("health", help="exit 0 when the model is ready, 4 otherwise")
    p.add_argument("--wait-s", type=float, default=0.0, help="keep polling up to this many seconds")
    _add_connection_options(p, top_level=False)
    return parser


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {raw}")
    return value


def _read_image(path: str) -> bytes:
    if path == "-":
        return sys.stdin.buffer.read()
    with open(path, "rb") as f:
        return f.read()


def _one_line(text: str) -> str:
    # Scripts capture the output line by line; a stray newline or tab would break that.
    return " ".join(text.replace("\t", " ").splitlines())


def _controls(args: argparse.Namespace) -> dict[str, Any]:
    return {dest: getattr(args, dest) for _, dest, _ in _CONTROL_FLAGS if getattr(args, dest) is not None}


def _error_record(err: Blip2Error) -> dict[str, Any]:
    return {"error": err.message, "error_type": type(err).__name__, "exit_code": exit_code(err)}


def _caption(client: Blip2Client, args: argparse.Namespace, images: list[tuple[str, bytes]]) -> int:
    controls = _controls(args)

    def one(data: bytes) -> str | Blip2Error:
        # Per-image errors are collected so one bad file does not hide the others' captions.
        try:
            return client.caption(data, **controls)
        except Blip2Error as e:
            return e

    with ThreadPoolExecutor(max(1, min(len(images), client.max_concurrency))) as pool:
        results = list(pool.map(one, [data for _, data in images]))

    codes = [exit_code(r) for r in results if isinstance(r, Blip2Error)]
    if args.json:
        records = [
            {"image": path, **(_error_record(r) if isinstance(r, Blip2Error) else {"text": r})}
            for (path, _), r in zip(images, results, strict=True)
        ]
        print(json.dumps(records, ensure_ascii=False))
    else:
        for (path, _), r in zip(images, results, strict=True):
            if isinstance(r, Blip2Error):
                print(f"blip2: {path}: {r.message}", file=sys.stderr)
            elif len(images) == 1:
                print(_one_line(r))
            else:
                print(f"{path}\t{_one_line(r)}")
    return codes[0] if codes else EXIT_OK


def _ask(client: Blip2Client, args: argparse.Namespace, image: tuple[str, bytes]) -> int:
    path, data = image
    text = client.ask(data, args.question, **_controls(args))
    if args.json:
        print(json.dumps({"image": path, "question": args.question, "text": text}, ensure_ascii=False))
    else:
        print(_one_line(text))
    return EXIT_OK


def _search(client: Blip2Client, args: argparse.Namespace) -> int:
    from ._search import EmbeddingStore, default_store_path, search

    store = None
    if not args.no_cache:
        store = EmbeddingStore(args.cache or default_store_path(args.url, client.retrieval_models.embed_image))
    result = search(client, args.dir, args.query, store=store, top_k=args.top_k, rerank=args.rerank)
    if store is not None and store.dropped_reason:
        print(f"blip2: embedding cache {store.path}: {store.dropped_reason}; started afresh", file=sys.stderr)
    for path, err in result.failures:
        message = err.message if isinstance(err, Blip2Error) else str(err)
        print(f"blip2: {path}: {message}", file=sys.stderr)
    if args.json:
        records = [{"path": h.path, "similarity": h.similarity, **({} if h.match is None else {"match": h.match})}
                   for h in result.hits]
        print(json.dumps(records, ensure_ascii=False))
    else:
        for h in result.hits:
            scores = f"{h.similarity:.4f}" if h.match is None else f"{h.match:.4f}\t{h.similarity:.4f}"
            print(f"{scores}\t{h.path}")
    codes = [exit_code(err) if isinstance(err, Blip2Error) else EXIT_USAGE for _, err in result.failures]
    return codes[0] if codes else EXIT_OK


def _health(client: Blip2Client, args: argparse.Namespace) -> int:
    if args.wait_s > 0:
        with contextlib.suppress(ServerUnavailableError):
            client.wait_until_ready(args.wait_s)
    live = client.is_live()
    ready = live and client.is_ready()
    if args.json:
        print(json.dumps({"url": args.url, "model": client.model_name, "live": live, "ready": ready}))
    else:
        print("ready" if ready else ("live, model not ready" if live else "unavailable"))
    return EXIT_OK if ready else EXIT_UNAVAILABLE


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        client = Blip2Client(
            args.url,
            protocol=args.protocol,
            timeout_s=args.timeout_s,
            retries=args.retries,
            model_name=args.model,
        )
    except ValueError as e:
        parser.error(str(e))

    images: list[tuple[str, bytes]] = []
    try:
        # Images are read before connecting so a typo in a path is a usage error, not a server error.
        if args.command == "caption":
            images = [(p, _read_image(p)) for p in args.images]
        elif args.command == "ask":
            images = [(args.image, _read_image(args.image))]
    except OSError as e:
        print(f"blip2: error: cannot read image: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "search" and not args.dir.exists():
        print(f"blip2: error: no such file or directory: {args.dir}", file=sys.stderr)
        return EXIT_USAGE

    try:
        with client:
            if args.command == "caption":
                return _caption(client, args, images)
            if args.command == "ask":
                return _ask(client, args, images[0])
            if args.command == "search":
                return _search(client, args)
            return _health(client, args)
    except Blip2Error as e:
        print(f"blip2: error: {e.message}", file=sys.stderr)
        return exit_code(e)
    except (TypeError, ValueError) as e:
        # Control values the client refuses before sending (e.g. --seed -1).
        print(f"blip2: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
