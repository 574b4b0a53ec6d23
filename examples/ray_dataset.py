"""Convert a dataset to .sdl on a Ray cluster: image files on shared storage, or image bytes in Parquet.

    # files: every image under SRC (recursively) -> OUT/<same relative path>.sdl, resumable
    python examples/ray_dataset.py files /mnt/data/photos /mnt/data/photos-sdl --report failures.jsonl
    # Parquet with image bytes (img2dataset / LAION style: columns key, jpg) -> Parquet of .sdl bytes
    python examples/ray_dataset.py parquet s3://bucket/laion/part-*.parquet s3://bucket/laion-sdl/ \\
        --bytes-column jpg --key-column key

Run it with ``--address auto`` on the head node of a running cluster (``ray start --head`` there, ``ray start
--address=HEAD:6379`` on each worker; every node with the same Python environment, pillow-sdlatent[ray] and
the model), or anywhere with ``--address ray://HEAD:10001``. Without an address it takes RAY_ADDRESS, else
the cluster ``ray start`` started on this machine, else it starts a local Ray. See docs/dataset.md.
"""

from __future__ import annotations

import argparse
import json
import sys

import pyarrow.dataset
import ray
import ray.data

from pillow_sdlatent import cli
from pillow_sdlatent import ray as sdl_ray


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["files", "parquet"])
    parser.add_argument("src", help="folder (files) or Parquet path/glob/URI (parquet)")
    parser.add_argument("out", help="output folder (files: on storage every node mounts) or Parquet URI")
    parser.add_argument("--address", help="cluster address: auto, HOST:6379, ray://HOST:10001 (default: as ray.init: "
                        "RAY_ADDRESS, else this machine's cluster, else a new local Ray)")  # fmt: skip
    parser.add_argument("--model", help="model spec, resolved on the driver (default: SDLATENT_MODEL, the SD VAE)")
    parser.add_argument("--quality", type=int)
    parser.add_argument("--actors", type=int, help="encoder actors (default: one per GPU of the cluster)")
    parser.add_argument("--batch-size", type=int, default=32, help="rows per actor call (32)")
    parser.add_argument("--forward-batch", type=int, default=1,
                        help="images per forward pass (1: Image.save's bytes; 8-16: faster on GPUs)")  # fmt: skip
    parser.add_argument("--shards", help="files: also write WebDataset tar shards to this folder")
    parser.add_argument("--report", help="files: JSON-lines table of every input (path, status, error, ...)")
    parser.add_argument("--bytes-column", default="jpg", help="parquet: the column of image file bytes")
    parser.add_argument("--key-column", default="key", help="parquet: the column that names a row")
    args = parser.parse_args(argv)

    if not ray.is_initialized():
        ray.init(address=args.address, include_dashboard=False)
    options = sdl_ray.EncodeOptions(model=args.model, quality=args.quality)
    sizing = dict(batch_size=args.batch_size, forward_batch=args.forward_batch, **sdl_ray.actor_resources(args.actors))
    print(f"cluster {ray.cluster_resources()}; encoder actors {sizing}", file=sys.stderr)

    if args.kind == "files":
        # Outputs keep the inputs' relative paths; those that exist and read back are skipped (resume).
        jobs, errors = cli.collect_jobs([args.src], args.out, None)
        report = sdl_ray.convert([(j.src, j.dst) for j in jobs if not j.decode], options, report=args.report,
                                 shards=args.shards, output_root=args.out, **sizing)  # fmt: skip
        failures = errors + report.failures
        print(f"{report.converted} converted, {report.skipped} skipped, {len(failures)} failed "
              f"in {report.seconds:.0f} s ({report.converted / max(report.seconds, 1e-9):.1f} images/s)")  # fmt: skip
        return 1 if failures else 0

    # Parquet: one pass, the table of .sdl bytes is also the report (status, error, bytes, seconds per row).
    ds = ray.data.read_parquet(args.src).select_columns([args.key_column, args.bytes_column])
    ds = ds.rename_columns({args.key_column: "path", args.bytes_column: "bytes"})
    sdl_ray.encode_dataset(ds, options, **sizing).write_parquet(args.out)
    table = pyarrow.dataset.dataset(args.out, format="parquet")  # local paths and s3://, gs:// URIs alike
    failed = table.to_table(columns=["path", "error"], filter=pyarrow.dataset.field("status") == sdl_ray.ERROR)
    for row in failed.to_pylist():
        print(json.dumps(row))
    return 1 if failed.num_rows else 0


if __name__ == "__main__":
    sys.exit(main())
