"""Which Beam runner obsfeed's pipelines run on: the caller's, else Beam's local FnApiRunner in-process.

Named explicitly because Beam's own default, ``DirectRunner``, first tries the Prism runner, which downloads its
binary from GitHub: on a machine without internet that costs a failed download and a second translation of the
graph on every pipeline (about 0.4 s for ingest here), and on a machine with internet the stage would run on a
different runner than the one measured and documented (docs/performance.md#local-runner).
"""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.portability.api import beam_provision_api_pb2
from apache_beam.runners.portability.fn_api_runner import fn_runner
from apache_beam.runners.portability.portable_runner import JobServiceHandle

DEFAULT_BEAM_ARGS = ("--runner=FnApiRunner", "--direct_running_mode=in_memory", "--direct_num_workers=1")
"""Beam's local FnApiRunner, in-process. ``--direct_running_mode=multi_processing --direct_num_workers=2`` runs
too: on 2026-12-02, 5 of 5 consecutive 2-worker ingest runs at 200k impressions (file-backed shuffle, 2 cores
shared with other work) were correct (row-count invariant held, units identical to in-process by content hash)
and slower, 7.5-8.4 s against 4.8-5.3 s in-process (at 1M, two earlier runs were about 5% faster). Earlier, while
tables went through the runner's shuffle, Beam 2.77's parallel bundle manager intermittently dropped part of a
grouped input at 1M impressions (about one run in three; caught by the ingest row-count invariant, reproduced with
Beam alone). On 2026-12-02 (fdd9eb8), 10 of 10 consecutive ``--direct_running_mode=multi_threading
--direct_num_workers=2`` ingest runs at 1M gave units and quarantine identical to in-process by content hash, in
8.0-8.6 s against 8.9 s in-process: too little gain to change the default. The invariant check stays on in every
mode. Those runs named ``--runner=DirectRunner``, which ran the same FnApiRunner, built as :func:`pipeline` builds
it, once Prism had failed to download. On 2026-12-03, with this default, 5 of 5 consecutive ``multi_processing``
2-worker ingest runs at 200k impressions gave units and quarantine identical to in-process by content hash (the
row-count invariant held), in 12.3-14.2 s against 12.3 s in-process."""


FNAPI_RUNNER_PATH = "apache_beam.runners.portability.fn_api_runner.FnApiRunner"


def beam_args_with_defaults(beam_args: Sequence[str]) -> list[str]:
    """The caller's Beam flags; the local in-process runner (:data:`DEFAULT_BEAM_ARGS`) only when no runner was
    named."""
    args = list(beam_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args = [*DEFAULT_BEAM_ARGS, *args]
    return args


def pipeline(beam_args: Sequence[str]) -> beam.Pipeline:
    """A stage's pipeline: the caller's flags, on the default runner when they name none.

    The FnApiRunner is built here with the options in its provision info, as ``DirectRunner`` builds it: Beam
    builds a runner named by ``--runner=FnApiRunner`` without them, and its ``multi_processing`` workers would then
    start without the caller's options (``--experiments``, ``--pickle_library``, ...)."""
    options = PipelineOptions(beam_args_with_defaults(beam_args))
    if options.view_as(StandardOptions).runner not in ("FnApiRunner", FNAPI_RUNNER_PATH):
        return beam.Pipeline(options=options)
    provision = beam_provision_api_pb2.ProvisionInfo(
        pipeline_options=JobServiceHandle.encode_pipeline_options(options.get_all_options()))
    runner = fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(provision))
    return beam.Pipeline(runner=runner, options=options)
