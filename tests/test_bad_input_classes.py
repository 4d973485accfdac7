"""Which test holds each class of the second bad-input sweep (issue "Nothing lost, nothing silently wrong").

``HELD_BY`` maps each reproduction to ``file::test`` (a probe of ``test_bad_inputs.PROBES`` as
``test_bad_inputs.py::probe name``); the test below fails when a named test or probe no longer exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
GRAPH = "test_checkpoint_checks.py::test_bad_checkpoint_is_one_line_naming_the_file"
GUARDS = "test_data_guards.py"
SWEEP = "test_malformed_inputs.py"

HELD_BY: dict[str, dict[str, str]] = {
    "data loss": {
        "model_grounding answers file is the question file": "test_bad_inputs.py::answers file is the question file",
        "a scorer's result file is one of its inputs": "test_bad_inputs.py::scorer's result file is its question file",
        "retention's result file is an input": "test_bad_inputs.py::retention result file is the base's answers",
        "scout_questions over the user's files": "test_bad_inputs.py::question files over the user's",
        "summary over the user's summary.md": "test_bad_inputs.py::summary over the user's summary.md",
        "training output inside the base's vision tower": "test_bad_inputs.py::training into its base's vision tower",
        "tiny --overwrite merges into a delta folder":
            "test_tiny.py::test_overwrite_replaces_the_folder_never_merges_into_it",
    },
    "silently wrong": {
        "two synth runs into one folder": f"{GUARDS}::test_a_second_synth_into_a_folder_being_written_is_refused",
        "two model_grounding runs into one answers file":
            f"{GUARDS}::test_a_second_model_grounding_into_an_answers_file_being_written_is_refused",
        "question ids that collide, repeat, or answered twice":
            f"{GUARDS}::test_refexp_scorer_refuses_ambiguous_or_malformed_inputs",
        "a 16-bit greyscale PNG turned white": "test_images.py::test_a_16_bit_grey_png_is_scaled_not_clipped",
        "config.json with fewer layers than the weights": GRAPH,
        "a tokenizer of another model": GRAPH,
        "summary follows symlink cycles": f"{GUARDS}::test_summary_does_not_follow_symlink_cycles",
        "--temperature nan": "test_bad_inputs.py::temperature not a number",
    },
    "tracebacks": {
        "validate with answer_boxes_xyxy_norm [5]":
            "test_bad_inputs.py::test_validate_reports_an_answer_box_of_one_number_as_a_bad_record",
        "stats / preview with conversations not a list": f"{SWEEP}::test_scout_json_readers_refuse_damage_in_one_line",
        "mix with a JSON list of numbers": "test_bad_inputs.py::mix of a JSON list of numbers",
        "one non-UTF-8 byte in a question file":
            f"{GUARDS}::test_every_reader_of_question_files_refuses_duplicates_and_bad_bytes",
        "boxes of strings or nulls in question files":
            f"{GUARDS}::test_refexp_scorer_refuses_ambiguous_or_malformed_inputs",
        "damaged question and answer files, any field":
            f"{SWEEP}::test_scorers_refuse_damaged_question_and_answer_files_in_one_line",
        "truncated or empty weights, tower weights, delta": GRAPH,
        "config.json a list, or hidden_size a string": GRAPH,
        "an empty tokenizer.model": GRAPH,
        "serve.cli --top_p -3": "test_bad_inputs.py::a negative top_p",
        "synth --image-size 100000": f"{GUARDS}::test_synth_sizes_and_counts_are_bounded",
        "--model-base a delta": "test_checkpoint_checks.py::test_a_delta_is_not_a_base",
        "training images that are 0-byte PNGs": "test_bad_inputs.py::training images that are 0-byte PNGs",
        "a checkpoint-N of another base in --output_dir":
            "test_bad_inputs.py::a checkpoint of another base in --output_dir",
    },
    "unbounded work": {
        "mix --ratio 1e9 or --replay-fraction 0.9999999": f"{GUARDS}::test_mix_amounts_are_bounded",
        "every number a scout_data command takes has a limit":
            f"{GUARDS}::test_every_number_a_scout_data_command_takes_has_a_stated_limit",
        "a 20000 x 8 PNG": "test_images.py::test_every_reader_refuses_a_long_strip_and_reads_16_bit",
    },
    "playground under load": {
        "requests sharing one output file":
            "test_playground_live.py::test_a_hundred_identical_requests_in_waves_are_all_answered_whole",
    },
    "left behind": {
        "SIGKILL of synth leaves temporaries": f"{GUARDS}::test_sigkill_then_resume_is_byte_identical_and_leaves_no_"
                                               "temporaries",
    },
    "minor": {
        "preview --out x.jpg writes PNG bytes": f"{GUARDS}::test_preview_writes_the_format_its_suffix_names",
        "validate --max-report -1": f"{GUARDS}::test_validate_refuses_a_negative_report_count",
        "validate accepts box_frame 'weird' and image_size '336x336'":
            f"{GUARDS}::test_validate_names_record_and_field_of_a_bad_frame_or_size",
        "image_aspect_ratio 'weird'": GRAPH,
        "an int64 delta tensor": GRAPH,
        "summary rows break on | or a newline": f"{GUARDS}::test_summary_rows_survive_pipes_and_newlines_in_names",
    },
}


# The fourth sweep (issue 48): each reproduction, and the test that holds it.
CHECKS = "test_checkpoint_checks.py::test_bad_checkpoint_is_one_line_naming_the_file"
BOUNDS = "test_worker_bounds.py"
HELD_BY["fourth sweep"] = {
    "U1 a client that leaves mid-answer": f"{BOUNDS}::test_a_client_gone_mid_answer_frees_the_model_within_a_second",
    "U2 a 20 MB prompt tokenized under the lock":
        f"{BOUNDS}::test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing",
    "U3 no request body limit": f"{BOUNDS}::test_a_body_over_one_image_is_refused_as_it_arrives",
    "U4 quadratic chunk splitting": f"{BOUNDS}::test_chunks_split_in_linear_time",
    "U5 a RefCOCO pickle sharing one sentence": "test_bad_inputs.py::RefCOCO refs sharing one long sentence",
    "U6 validate /dev/zero": "test_bad_inputs.py::validate /dev/zero",
    "H1 a worker that never finishes": f"{BOUNDS}::test_the_client_gives_up_on_a_worker_that_never_finishes",
    "S1 a full checkpoint listing fewer twin layers": CHECKS,
    "S2 unknown twist_ keys": CHECKS,
    "S3 tiny writes what its loader refuses": "test_bad_inputs.py::tiny --hidden-size 0",
    "S4 synth ignores --min-objects": "test_bad_inputs.py::synth --min-objects that cannot fit",
    "S5 validate passes duplicate ids and unknown tasks":
        "test_scout_validate.py::test_validate_reports_what_a_consumer_would_refuse",
    "T1 playground uploads that do not decode":
        "test_playground_app.py::test_uploads_that_do_not_decode_get_one_message",
    "T2 preview of a decompression bomb": "test_bad_inputs.py::preview of a decompression bomb",
    "T3 config fields the loader does not check": CHECKS,
    "T4 tiny heads, vocabulary, huge sizes": "test_bad_inputs.py::tiny --num-attention-heads 3",
    "T5 a deeply nested body": f"{BOUNDS}::test_a_deeply_nested_body_gets_an_error_chunk",
    "T6 a client gone mid-upload": f"{BOUNDS}::test_a_client_gone_mid_upload_is_no_error",
    "minor: a lone surrogate in a prompt": f"{BOUNDS}::test_a_lone_surrogate_is_named_as_the_clients_problem",
}


def defined_tests(file: Path) -> set[str]:
    tree = ast.parse(file.read_text(encoding="utf-8"))
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def probe_names() -> set[str]:
    return set(re.findall(r'Probe\("([^"]+)"', (TESTS / "test_bad_inputs.py").read_text(encoding="utf-8")))


def test_every_class_of_the_sweep_names_a_test_that_exists() -> None:
    missing = []
    for group in HELD_BY.values():
        for reproduction, held in group.items():
            file, name = held.split("::")
            found = defined_tests(TESTS / file) if (TESTS / file).is_file() else set()
            if name not in found and not (file == "test_bad_inputs.py" and name in probe_names()):
                missing.append(f"{reproduction}: {held}")
    assert missing == []
