"""Sources of SCOUT samples. Each source module ``scout_data.sources.<name>`` provides

- ``add_arguments(parser)``: its own command-line flags (the CLI adds ``--out --seed --frame --resume
  --shard-size`` itself);
- ``iter_samples(args) -> Iterator[Sample | Skip]``: the samples, and a ``Skip(ref, reason)`` for each
  input record it cannot use;

and optionally

- ``image_folder(args) -> str``: the folder LLaVA's ``--image_folder`` must point at (image paths in the
  samples are relative to it); without it the CLI uses ``args.images``;
- ``estimate_total(args) -> int``: the number of records expected, for the progress bar.

With ``--resume`` the CLI sets ``args.skip_ids`` (ids already written); a source may use it to skip
work, and the writer drops those ids either way.
"""
