"""The `image-similarity` command: each step of the job as a subcommand, and `run` for all of them.

The commands import the steps that train, rank or run a network when they run: torch and scikit-learn take a
second or more each to import, and `--help`, ingest, split and the in-database commands (--context sql) do without
them (tests/test_cli.py checks it)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

from .. import __version__
from .. import store as stores
from ..contexts.spark_settings import DEFAULT_MASTER
from ..contexts.sql import call
from ..core.images import BadImageError
from ..errors import BadInput, ImageSimilarityError, NotFound
from ..features.specs import BACKBONES, DEFAULT_BACKBONE, PRECISIONS, RUNTIMES
from ..pipeline import split
from ..pipeline.ingest import ingest, ingest_view
from ..pipeline.manifest import ingest_manifest
from ..pipeline.refine_settings import Settings
from ..pipeline.steps import BATCH_SIZE, STEPS, Results, Run, choose_model, run_job, run_steps
from ..resources import sample_dataset
from ..search import ann
from ..search.ann import ANN_THRESHOLD, INDEXES
from ..search.methods import METHODS, ranking_method
from ..store import DEFAULT_DB
from ..store.postgres import EF_SEARCH, EF_SEARCH_MAX, EF_SEARCH_PER_MATCH
from . import sqlserver
from .reports import (
    print_audit,
    print_class_notes,
    print_evaluation,
    print_featurize,
    print_ingest,
    print_left_out,
    print_neighbors,
    print_ranking,
    print_refine,
    print_run_step,
    print_split,
    print_train,
)

DEFAULT_OUT = "image-similarity-output"


def build_parser() -> argparse.ArgumentParser:
    """The command line: one sub-command per step, then the commands on rankings, labels and the service."""
    common, net, cluster = _shared_options()
    parser = argparse.ArgumentParser(
        prog="image-similarity",
        description="Find catalogue images similar to a query image: ingest labelled images into a database, "
                    "featurize them with a pretrained CNN, split, train a linear SVM, evaluate, and rank.",
        epilog="Start with 'image-similarity run' to do every step on the bundled sample data. To deploy into SQL "
               "Server, or to check a server met for the first time: 'image-similarity sqlserver --help'.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _step_commands(sub, common, net, cluster)
    _ranking_commands(sub, common, net, cluster)
    _label_commands(sub, common)
    _service_commands(sub, common, net)
    return parser


def _shared_options() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser, argparse.ArgumentParser]:
    """The options several commands share: the store and context, the network, the Spark cluster."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--db", default=None, metavar="DB",
                        help="database: a SQLite file path, sqlite:///path, postgresql://[user@]host[:port]/database "
                             "(password in PGPASSWORD or ~/.pgpass), or mssql://[user@]host[:port]/database "
                             "(password in IMAGE_SIMILARITY_DB_PASSWORD); default: image_similarity.sqlite here")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    common.add_argument("--context", choices=("local", "sql", "spark"), default="local",
                        help="where steps compute: local (here, default), sql (the stored procedures inside "
                             "the database server; needs --db postgresql://... or mssql://...; ingest always "
                             "runs here) or spark (featurize and neighbors on Apache Spark: see --master)")
    net = argparse.ArgumentParser(add_help=False)
    net.add_argument("--backbone", default=None, metavar="NAME",
                     help=f"network: {', '.join(sorted(BACKBONES))}, or a refined network stored by 'refine' "
                          f"(default: {DEFAULT_BACKBONE}, or the trained model's)")
    net.add_argument("--weights", metavar="FILE", help="checkpoint file to use instead of the default location")
    net.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
    net.add_argument("--precision", choices=PRECISIONS, default="auto",
                     help="forward-pass precision (default: auto: bf16 on CPUs measured to run it fast, e.g. with "
                          "AMX or AVX-512 BF16; fp16 mixed precision on CUDA; fp32 elsewhere)")
    net.add_argument("--runtime", choices=RUNTIMES, default="auto",
                     help="what runs the network (default: auto: whichever of torch, ONNX Runtime and OpenVINO is "
                          "measured fastest on this CPU; always torch on CUDA): see docs/runtimes.md")

    cluster = argparse.ArgumentParser(add_help=False)  # issue 17: --context spark
    cluster.add_argument("--master", default=DEFAULT_MASTER, metavar="URL",
                         help=f"Spark master for --context spark: {DEFAULT_MASTER} (default), local[N], "
                              "spark://host:7077, yarn, k8s://...; SQLite databases only with a local master")
    cluster.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                         help="a Spark setting for --context spark, repeatable, e.g. --conf spark.task.cpus=4")
    return common, net, cluster


def _step_commands(sub: Any, common: argparse.ArgumentParser, net: argparse.ArgumentParser,
                   cluster: argparse.ArgumentParser) -> None:
    """The steps of the job: ingest, featurize, split, train, evaluate, refine."""
    p = sub.add_parser("ingest", parents=[common], help="load a folder of images, or a manifest of items",
                       description="Store every image under DIR with its label (the sub-folder name; files at the "
                                   "top level are unlabelled), or every row of a manifest (--manifest). Bad files "
                                   "and rows are skipped and recorded with the reason; re-running adds nothing new.",
                       epilog="A manifest is a CSV file with a header row, or JSON lines (.jsonl), one item per "
                              "row: 'path' (the image file, relative to the manifest's folder or absolute), "
                              "optional 'label' (empty: unlabelled) and 'key' (your id of the item, unique; "
                              "a key ingested again with other bytes replaces its image), and any other columns, "
                              "kept as the item's metadata and returned with every result. See docs/catalogues.md.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("dir", type=Path, nargs="?", help="folder with one sub-folder per class")
    source.add_argument("--manifest", type=Path, metavar="FILE",
                        help="CSV or JSON-lines file of items: path, label, key and metadata columns (see below)")
    source.add_argument("--from-view", action="store_true",
                        help="the rows of the view image_source (item_key, label, data) made in the database over "
                             "your own table (see docs/catalogues.md)")

    p = sub.add_parser("featurize", parents=[common, net, cluster], help="compute feature vectors for stored images",
                       description="Run the pretrained network over every stored image without features for "
                                   "the backbone. Resumable: an interrupted run loses at most one batch.")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"images per batch (default: {BATCH_SIZE})")

    p = sub.add_parser("split", parents=[common], help="stratified train/test split, near-duplicates kept together",
                       description="Split the stored images per class; near-duplicate images stay on one side.")
    p.add_argument("--test-fraction", type=float, default=split.TEST_FRACTION,
                   help=f"share of each class for testing (default: {split.TEST_FRACTION})")
    p.add_argument("--seed", type=int, default=0, help="random seed: same seed, same split (default: 0)")

    p = sub.add_parser("train", parents=[common], help="train a linear SVM (C by cross-validation)",
                       description="Train a linear SVM on the training split's features, choosing C by "
                                   "cross-validation, and store it as a new model version.")
    p.add_argument("--backbone", metavar="NAME", help="features to train on (default: the most complete)")
    p.add_argument("--C", type=float, nargs="+", default=None, metavar="C", help="candidate C values")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")

    p = sub.add_parser("evaluate", parents=[common], help="accuracy, confusion, ROC and ranking quality",
                       description="Evaluate a model on its split: accuracies, confusion matrix, ROC/AUC, and "
                                   "per ranking method the rank of 1 positive among 100 negatives per test image, "
                                   "drawn from the test split as the original solution did ('ranking') and from "
                                   "the training images ('catalogue_ranking', with Recall@k, mAP, precision@10 "
                                   "and look-alike@10). Stores the figures and writes PNG plots.")
    p.add_argument("--model-version", type=int, help="model version (default: latest)")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"folder for plots (default: {DEFAULT_OUT})")
    p.add_argument("--json", action="store_true", help="print all figures as one JSON object")
    p.add_argument("--seed", type=int, default=0, help="seed for drawing each query's positive and negatives (default: 0)")

    p = sub.add_parser("refine", parents=[common], help="fine-tune the pretrained network on the training labels",
                       description="Fine-tune a pretrained backbone on the training split's labels (validation "
                                   "carved out of it; the test split is never read) and store it in the database "
                                   "as a new network, NAME_refined_VERSION, usable as --backbone everywhere. "
                                   "Interruptible: the state is stored after every epoch and running the same "
                                   "command again resumes; once finished, it prints the stored network's name.",
                       epilog="Then: image-similarity featurize --backbone NAME && image-similarity train --backbone "
                              "NAME && image-similarity evaluate (or: image-similarity run --refine).")
    p.add_argument("--backbone", choices=sorted(BACKBONES), default=DEFAULT_BACKBONE,
                   help=f"pretrained network to start from (default: {DEFAULT_BACKBONE})")
    _refine_options(p)
    p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")


def _ranking_commands(sub: Any, common: argparse.ArgumentParser, net: argparse.ArgumentParser,
                      cluster: argparse.ArgumentParser) -> None:
    """Ranking a query, and every image's neighbours."""
    p = sub.add_parser("rank", parents=[common, net], help="the catalogue images most similar to a query image",
                       description="Featurize QUERY and list the most similar catalogue images (never the "
                                   "query itself or its near duplicates). Results are stored in the rankings table.")
    p.add_argument("query", type=Path, help="query image file")
    p.add_argument("--top", type=int, default=10, help="how many images (default: 10)")
    p.add_argument("--method", choices=METHODS, help="similarity (default: the best in the latest evaluation)")
    p.add_argument("--model-version", type=int, help="model version (default: latest)")
    p.add_argument("--index", choices=INDEXES, default="exact",
                   help="exact: score every image (default); hnsw: approximate l2/cosine search on a graph built "
                        f"first (needs faiss; pays only for many queries); auto: hnsw from {ANN_THRESHOLD:,} images "
                        "when faiss is installed")
    p.add_argument("--ef-search", type=int, metavar="N",
                   help="candidates an HNSW search looks at: more is slower and finds more of the exact top (default: "
                        f"in PostgreSQL max({EF_SEARCH}, {EF_SEARCH_PER_MATCH} x top), at most {EF_SEARCH_MAX}; "
                        f"in memory {ann.EF_SEARCH})")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw the query beside its matches into this PNG")

    p = sub.add_parser("neighbors", parents=[common, cluster], help="the top k similar images of every image",
                       description="Store the top k most similar catalogue images of every catalogue image in the "
                                   "neighbors table (same methods as rank; never an image itself or its near "
                                   "duplicates). Exact, in blocks of rows that fit --memory; images already done "
                                   "are skipped, so an interrupted run resumes and a re-run adds nothing.")
    p.add_argument("--backbone", metavar="NAME",
                   help="features: a pretrained or refined network (default: the trained model's)")
    p.add_argument("--method", choices=METHODS, help="similarity (default: the best in the latest evaluation)")
    p.add_argument("--top", type=int, default=10, help="neighbours per image (default: 10)")
    p.add_argument("--model-version", type=int, help="model version for scores/learned (default: latest)")
    p.add_argument("--memory", type=int, default=512, metavar="MB",
                   help="MB for one block of scores, on top of the catalogue in memory (default: 512)")
    p.add_argument("--refresh", action="store_true",
                   help="first remove the stored neighbours of this backbone and method (after images changed)")


def _label_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    """Checking and changing the labels: audit, suggest, relabel, remove."""
    p = sub.add_parser("audit", parents=[common], help="images that are probably mislabelled or duplicated",
                       description="List the labelled images whose label the model disputes, from out-of-fold "
                                   "class probabilities (each image judged by a model trained without it and its "
                                   "near duplicates), near duplicates stored under different labels, and classes "
                                   "too small to learn; likeliest mistakes first. Act on it with 'relabel' and "
                                   "'remove' (or --apply), then train and evaluate again.")
    p.add_argument("--backbone", metavar="NAME", help="features to judge by (default: the latest model's)")
    p.add_argument("--cutoff", type=float, default=None, metavar="P",
                   help="flag an image when another class has at least this out-of-fold probability "
                        "(default: 0.5, more likely than its own label and the rest together)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds (default: 0)")
    p.add_argument("--top", type=int, default=20, help="suspects printed in the table and drawn (default: 20)")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")
    p.add_argument("--sheet", type=Path, metavar="PNG", help="also draw the top suspects into this PNG")
    p.add_argument("--apply", action="store_true",
                   help="relabel every suspect to the class the model suggests (review the report first)")

    p = sub.add_parser("suggest", parents=[common], help="labels the latest model suggests for unlabelled images",
                       description="For every unlabelled, featurized image: the class the latest model finds "
                                   "likeliest and its probability (computed now, never stored), likeliest first.",
                       epilog="Accept one with 'image-similarity relabel ID LABEL'.")
    p.add_argument("--model-version", type=int, help="model version (default: latest)")
    p.add_argument("--json", action="store_true", help="print every suggestion as JSON")

    p = sub.add_parser("relabel", parents=[common], help="give a stored image another label",
                       description="Set the label of image ID; the next train and evaluate use it.")
    p.add_argument("id", type=int, help="image id (see 'audit')")
    p.add_argument("label", help="one of the stored classes")
    p.add_argument("--new-class", action="store_true", help="allow a label that no stored image has yet")

    p = sub.add_parser("remove", parents=[common], help="remove a stored image",
                       description="Remove image ID with its features, split row, neighbours and the stored "
                                   "rankings that name it.")
    p.add_argument("id", type=int, help="image id (see 'audit')")


def _service_commands(sub: Any, common: argparse.ArgumentParser, net: argparse.ArgumentParser) -> None:
    """The whole job at once, and the web service."""
    p = sub.add_parser("run", parents=[common, net], help="every step, then rank a sample query",
                       description="Ingest DIR (default: the bundled sample), featurize, split, train, evaluate, "
                                   "print a summary, and rank one test image.")
    p.add_argument("dir", type=Path, nargs="?", help="folder with one sub-folder per class (default: bundled sample)")
    p.add_argument("--out", type=Path, default=Path(DEFAULT_OUT), help=f"folder for plots (default: {DEFAULT_OUT})")
    p.add_argument("--seed", type=int, default=0, help="random seed for split, training and evaluation (default: 0)")
    p.add_argument("--refine", action="store_true",
                   help="also refine the network on the training split, then featurize, train and evaluate with it "
                        "(both summaries are printed; the refined model is the latest)")
    p.add_argument("--epochs", type=int, help="with --refine: refine epochs (default: refine's)")

    p = sub.add_parser("serve", parents=[common, net], help="web service and page: upload an image, see the top 10",
                       description="Serve a REST API (POST /api/rank, GET /api/images/ID, /api/images/ID/neighbors, "
                                   "/api/health, /api/model, /api/catalogue, /api/audit; OpenAPI schema at "
                                   "/openapi.json) and a page at / to try it, on the latest model. A new model or newly featurized "
                                   "images are picked up without a restart; uploads are limited to 10 MB. Catalogue "
                                   "writes (POST and DELETE /api/images, PUT /api/images/ID/label) need an API key.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key-file", type=Path, metavar="FILE",
                   help="file holding the API key that catalogue writes (POST/DELETE /api/images, PUT .../label) "
                        "need as "
                        "'Authorization: Bearer KEY' (default: the IMAGE_SIMILARITY_API_KEY environment variable; "
                        "with neither, writes answer 403)")
    p.add_argument("--protect-reads", action="store_true", help="reads need the API key too (not /api/health)")
    p.add_argument("--reload-interval", type=float, default=2.0, metavar="SECONDS",
                   help="how often to check the database for a new model or features and reload (default: 2; "
                        "0: never)")
    p.add_argument("--no-background-featurize", dest="featurize_added", action="store_false",
                   help="leave images added through the service for 'image-similarity featurize'")


def _refine_options(p: argparse.ArgumentParser) -> None:
    defaults = Settings()
    p.add_argument("--epochs", type=int, help=f"most epochs (default: {defaults.epochs}; stops early after "
                                              f"{defaults.patience} without a better validation score)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the validation part, augmentation and head (default: 0)")
    p.add_argument("--image-size", type=int, default=defaults.image_size,
                   help=f"training crop side in pixels (default: {defaults.image_size}; smaller is faster)")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help=f"images per step (default: {defaults.batch_size})")
    p.add_argument("--freeze", type=float, default=defaults.freeze,
                   help=f"share of the network, from the input side, left untrained (default: {defaults.freeze})")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="training precision (default: auto: bf16 autocast on CPUs measured to run it fast; fp16 "
                        "mixed precision on CUDA; fp32 elsewhere)")


def _featurizer(args: argparse.Namespace, backbone: str | None = None, store=None):
    from ..pipeline.featurize import Featurizer  # lazy: scikit-learn (module docstring)

    return Featurizer(backbone or args.backbone or DEFAULT_BACKBONE, device=args.device, weights=args.weights,
                      precision=args.precision, store=store, runtime=args.runtime)


def cmd_ingest(store, args) -> None:
    if getattr(args, "from_view", False):
        report = ingest_view(store, not args.quiet)
    elif getattr(args, "manifest", None):
        report = ingest_manifest(store, args.manifest, not args.quiet)
    else:
        report = ingest(store, args.dir, not args.quiet)
    print_ingest(report)


def cmd_featurize(store, args) -> None:
    from ..pipeline.featurize import featurize  # lazy: scikit-learn (module docstring)

    print_featurize(featurize(store, _featurizer(args, store=store), batch_size=args.batch_size,
                              progress=not args.quiet))


def cmd_split(store, args) -> None:
    print_split(split.split_report(store, args.test_fraction, args.seed))


def cmd_train(store, args) -> None:
    from ..pipeline.train import C_GRID, train  # lazy: scikit-learn (module docstring)

    print_train(train(store, args.backbone, args.C or C_GRID, seed=args.seed))


def cmd_evaluate(store, args) -> None:
    from ..pipeline.evaluate import evaluate  # lazy: scikit-learn (module docstring)
    from ..pipeline.train import load_model  # lazy: scikit-learn (module docstring)

    summary = evaluate(store, load_model(store, args.model_version), out_dir=out_folder(args.out), seed=args.seed)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print_evaluation(summary)


def cmd_rank(store, args) -> None:
    from ..pipeline.rank import rank  # lazy: scikit-learn (module docstring)

    model, backbone = choose_model(store, args.model_version, args.backbone,
                                   required=args.method is not None and ranking_method(args.method).needs_model)
    data = read_file(args.query, "query image")
    result = rank(store, data, _featurizer(args, backbone, store),
                  top=args.top, method=args.method, model=model, name=args.query.name, index=args.index,
                  ef_search=args.ef_search)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_ranking(result)
    if args.plot:
        from .plots import ranking_plot  # lazy: matplotlib, for the commands that plot

        save_figure(ranking_plot(store, data, result), args.plot)
        if not args.json:
            print(f"  plot: {args.plot}")


def save_figure(figure, path: Path) -> None:
    """Write a figure as PNG and close it; BadInput, in one line, when the file cannot be written."""
    from .plots import plt  # lazy: matplotlib, for the commands that plot

    try:
        figure.savefig(path, dpi=100)
    except OSError as err:
        raise BadInput(f"cannot write the plot {path}: {err.strerror or err}") from None
    finally:
        plt.close(figure)


def cmd_audit(store, args) -> None:
    from ..pipeline.audit import CUTOFF, apply_suggestions, audit  # lazy: scikit-learn (module docstring)
    from .plots import audit_sheet  # lazy: matplotlib, for the commands that plot

    if args.top < 1:
        raise BadInput(f"--top must be at least 1, got {args.top}")
    report = audit(store, args.backbone, CUTOFF if args.cutoff is None else args.cutoff, seed=args.seed)
    if args.sheet:
        save_figure(audit_sheet(store, report, args.top), args.sheet)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_audit(report, args.top)
        if args.sheet:
            print(f"  contact sheet: {args.sheet}")
    if args.apply:
        print(f"relabelled {apply_suggestions(store, report)} images to the suggested class: "
              "run train and evaluate again", file=sys.stderr if args.json else sys.stdout)


def cmd_suggest(store, args) -> None:
    from ..pipeline.suggest import suggestions  # lazy: scikit-learn (module docstring)
    from ..pipeline.train import load_model  # lazy: scikit-learn (module docstring)

    found = sorted(suggestions(store, load_model(store, args.model_version)), key=lambda s: (-s.probability, s.id))
    if args.json:
        print(json.dumps([s.to_dict() for s in found], indent=2))
        return
    print(f"{len(found)} unlabelled images")
    for s in found:
        print(f"  {s.id:>6}  {s.suggested:<12} {s.probability:.3f}  {s.key or '-'}  {s.name}")


def cmd_relabel(store, args) -> None:
    from ..pipeline.audit import relabel  # lazy: scikit-learn (module docstring)

    old, new = relabel(store, args.id, args.label, args.new_class)
    print(f"image {args.id}: {old or '(unlabelled)'} -> {new} (run train and evaluate again)")


def cmd_remove(store, args) -> None:
    from ..pipeline.audit import remove  # lazy: scikit-learn (module docstring)

    remove(store, args.id)
    print(f"removed image {args.id} with its features, split row and neighbours")


def neighbor_options(store, args) -> tuple[Any, str, str]:
    """(model, backbone, method) of a neighbors command: the options, else the model's and its best evaluated
    method."""
    from ..pipeline.rank import default_method  # lazy: scikit-learn (module docstring)

    model, backbone = choose_model(store, args.model_version, args.backbone)
    return model, backbone, args.method or default_method(store, model)


def cmd_neighbors(store, args) -> None:
    from ..pipeline.neighbors import neighbors  # lazy: scikit-learn (module docstring)

    model, backbone, method = neighbor_options(store, args)
    print_neighbors(neighbors(store, backbone, method, args.top, model, memory=args.memory * 2 ** 20,
                              refresh=args.refresh, progress=not args.quiet))


def cmd_spark(store, args) -> None:
    """Run featurize or neighbors on Spark (--context spark): tasks open the --db store themselves."""
    from ..contexts import spark  # lazy: scikit-learn (module docstring)

    db = str(args.db or DEFAULT_DB)
    spark.check_store(db, args.master)
    session = spark.session(args.master, spark.parse_conf(args.conf))
    try:
        if args.command == "featurize":
            report = spark.featurize_on_spark(session, db, args.backbone or DEFAULT_BACKBONE, args.device,
                                              args.weights, args.batch_size, progress=not args.quiet,
                                              precision=args.precision, runtime=args.runtime)
            print_featurize(dataclasses.replace(report, device=f"Spark {args.master}, {report.device}"))
        else:
            _, backbone, method = neighbor_options(store, args)
            print_neighbors(spark.neighbors_on_spark(session, db, backbone, method, args.top, args.model_version,
                                                     args.memory * 2 ** 20, args.refresh, progress=not args.quiet))
    finally:
        session.stop()


def cmd_refine(store, args) -> None:
    chosen = Settings(**{k: getattr(args, k) for k in ("image_size", "batch_size", "freeze")})
    run = Run(store, backbone=args.backbone, epochs=args.epochs, seed=args.seed, progress=not args.quiet,
              device=args.device, precision=args.precision, refine_settings=chosen)
    record, _ = STEPS["refine"].compute(run, Results())
    print_refine(record)


def cmd_run(store, args) -> None:
    run = Run(store, lambda backbone: _featurizer(args, backbone, store), folder=args.dir or sample_dataset(),
              seed=args.seed, out=out_folder(args.out), progress=not args.quiet, epochs=args.epochs,
              device=args.device, precision=args.precision, backbone=args.backbone)
    run_job(run, run_steps(args.refine), show=print_run_step)


def cmd_serve(store, args) -> None:
    import uvicorn  # lazy: the web service's packages, for serve alone

    from .web import API_KEY_ENV, create_app  # lazy: the web service's packages, for serve alone

    key = _api_key(args.api_key_file, API_KEY_ENV)
    if args.protect_reads and not key:
        raise BadInput(f"--protect-reads needs an API key: set {API_KEY_ENV} or --api-key-file")
    _, backbone = choose_model(store, backbone=args.backbone, required=True)  # the service serves the latest model
    app = create_app(store, _featurizer(args, backbone, store), api_key=key,
                     protect_reads=args.protect_reads, reload_interval=args.reload_interval,
                     featurize_added=args.featurize_added, db=args.db or DEFAULT_DB)
    uvicorn.run(app, host=args.host, port=args.port)


def read_file(path: Path, what: str) -> bytes:
    """The bytes of a file the user named; NotFound or BadInput, in one line, when it cannot be read."""
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise NotFound(f"{what} {path}: {err.strerror}") from None
    except OSError as err:
        raise BadInput(f"cannot read the {what} {path}: {err.strerror or err}") from None


def out_folder(path: Path) -> Path:
    """The --out folder, made when missing; BadInput when it cannot be made or written into."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(f"cannot make the folder {path}: {err.strerror or err}") from None
    if not os.access(path, os.W_OK):
        raise BadInput(f"cannot write into the folder {path}")
    return path


def _api_key(path: Path | None, env: str) -> str | None:
    """The operator's API key, from the file `path` or else the environment variable `env`; never printed."""
    if path is None:
        return os.environ.get(env) or None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(f"cannot read the API key file {path}: {getattr(err, 'strerror', None) or err}") from None
    if not key:
        raise BadInput(f"the API key file {path} is empty")
    return key


SQL_STEPS = {step.name: (step.procedure, step.parameters) for step in STEPS.values() if step.procedure}
"""--context sql: the stored procedure of each command and the options it passes on."""


def cmd_sql(store, args) -> None:
    """Run the step as its stored procedure inside the database server (--context sql); print what it returns."""
    if args.command == "run":  # the client stores the images; the server runs the JOB (Initial_Run_Once)
        cmd_ingest(store, argparse.Namespace(dir=args.dir or sample_dataset(), quiet=args.quiet))
    procedure, names = SQL_STEPS[args.command]
    values = {name: getattr(args, name, None) for name in names}
    if args.command == "rank":
        values.update(query=read_file(args.query, "query image"), query_name=args.query.name)
    if args.command == "train" and args.C:
        values["c_grid"] = json.dumps(args.C)
    columns, rows = call(store, procedure, **values)
    print(f"{procedure} ran inside {store.server}")
    if columns == ["summary"]:
        print_evaluation(rows[0][0])
    elif columns:
        print("  " + "  ".join(columns))
        for row in rows:
            print("  " + "  ".join(str(v) for v in row))
    if args.command == "split":
        print_class_notes(split.notes(store))
    if args.command == "train":
        print_left_out(store.model().params)
    if args.command == "run":
        print_evaluation(store.evaluation().summary)
        if args.refine:  # refine inside the server too, then the same job on the refined network's features
            refine = STEPS["refine"].procedure
            columns, rows = call(store, refine, backbone=args.backbone, epochs=args.epochs, seed=args.seed)
            print(f"{refine} ran inside {store.server}: " + ", ".join(f"{c} {v}" for c, v in zip(columns, rows[0])))
            call(store, procedure, backbone=rows[0][0], seed=args.seed)
            print_evaluation(store.evaluation().summary)


COMMANDS = {"ingest": cmd_ingest, "featurize": cmd_featurize, "split": cmd_split, "train": cmd_train,
            "evaluate": cmd_evaluate, "rank": cmd_rank, "run": cmd_run, "refine": cmd_refine,
            "serve": cmd_serve, "neighbors": cmd_neighbors, "audit": cmd_audit, "relabel": cmd_relabel,
            "suggest": cmd_suggest,
            "remove": cmd_remove}
SPARK_STEPS = ("featurize", "neighbors")
"""--context spark: the commands that run on Spark."""


def main(argv: list[str] | None = None) -> int:
    """Run one command. The one place errors are rendered: an ImageSimilarityError (the user can act on it) is
    one line and exit status 1, an interruption exit status 130 with a hint to resume; anything else is a bug and
    keeps its traceback."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sqlserver"]:  # issue 27: deploying to SQL Server, its own parser (entrypoints/sqlserver.py)
        return sqlserver.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        with stores.connect(args.db or DEFAULT_DB) as store:
            sql = args.context == "sql" and args.command in SQL_STEPS
            if args.context == "spark" and args.command not in SPARK_STEPS:
                raise BadInput(f"--context spark runs {' and '.join(SPARK_STEPS)}, not {args.command}")
            (cmd_sql if sql else cmd_spark if args.context == "spark" else COMMANDS[args.command])(store, args)
    except KeyboardInterrupt:
        print("image-similarity: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except ImageSimilarityError as err:
        query = f"{args.query}: " if isinstance(err, BadImageError) and getattr(args, "query", None) else ""
        print(f"image-similarity: error: {query}{err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
