import base64
import io
import json
import subprocess
import sys

import pytest
from PIL import Image

from model.config import CogVLMConfig
from model.processor import Conversation, Processor, load_tokenizer
from server.cli import main


def run_json(capsys, *args):
    assert main(["generate", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "shapes.png"
    Image.new("RGB", (60, 40), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("with_image", [True, False])
def test_generate_json_is_deterministic_at_temperature_zero(capsys, tiny_checkpoint, image_file, with_image):
    args = ["--model", str(tiny_checkpoint), "--prompt", "What is in the image?", "--max-tokens", "5"]
    if with_image:
        args += ["--image", str(image_file)]
    first, second = run_json(capsys, *args), run_json(capsys, *args)
    assert first == second
    cfg = CogVLMConfig.from_checkpoint(tiny_checkpoint)
    assert set(first) == {"prompt_token_ids", "output_token_ids", "text", "finish_reason"}
    assert first["prompt_token_ids"][0] == cfg.bos_token_id
    num_image = first["prompt_token_ids"].count(cfg.pad_token_id)
    assert num_image == (cfg.num_image_tokens if with_image else 0)
    assert first["finish_reason"] in ("stop", "length") and 1 <= len(first["output_token_ids"]) <= 5
    assert isinstance(first["text"], str)


def test_top_logprobs_in_json(capsys, tiny_checkpoints):
    out = run_json(
        capsys,
        "--model",
        str(tiny_checkpoints[1]),
        "--prompt",
        "Hi",
        "--max-tokens",
        "3",
        "--top-logprobs",
        "4",
    )
    assert len(out["top_logprobs"]) == len(out["output_token_ids"])
    for token, top in zip(out["output_token_ids"], out["top_logprobs"], strict=True):
        assert len(top) == 4 and top[0][0] == token and top[0][1] >= top[-1][1]


def test_messages_file_with_history_system_and_data_uri(capsys, tmp_path, tiny_checkpoints):
    folder = tiny_checkpoints[2]
    buffer = io.BytesIO()
    Image.new("RGBA", (30, 50), (0, 90, 200, 255)).save(buffer, format="WEBP")
    uri = "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What colour?"},
                {"type": "image_url", "image_url": {"url": uri, "detail": "high"}},
            ],
        },
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And the shape?"},
    ]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(messages))
    out = run_json(capsys, "--model", str(folder), "--messages", str(path), "--max-tokens", "2")
    cfg = CogVLMConfig.from_checkpoint(folder)
    conversation = Conversation(
        query="And the shape?",
        history=(("What colour?", "Blue."),),
        image=Image.new("RGB", (30, 50)),
        system="Answer briefly.",
    )
    want = Processor(load_tokenizer(folder), cfg).build(conversation)
    assert out["prompt_token_ids"] == want.input_ids


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent", "--prompt", "Hi"], "/nonexistent/config.json: not found"),
        (["--prompt", "Hi", "--image", "/nonexistent.png"], "image file not found"),
        (["--prompt", "Hi", "--max-model-len", "100000"], "exceeds the checkpoint's max_position_embeddings"),
        (["--prompt", "Hi", "--kv-cache-gb", "0.000001"], "the KV pool holds 16 tokens"),
    ],
)
def test_bad_input_exits_2_with_a_message(capsys, tiny_checkpoints, args, message):
    if "--model" not in args:
        args = ["--model", str(tiny_checkpoints[1]), *args]
    assert main(["generate", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, value",
    [("--port", "99999"), ("--max-model-len", "0"), ("--request-timeout", "0"), ("--max-image-pixels", "0"),
     ("--max-num-seqs", "0"), ("--block-size", "-16"), ("--kv-cache-gb", "nan"), ("--gpu-memory-fraction", "1.5"),
     ("--max-n", "two"), ("--max-queued-requests", "-1")],
)  # fmt: skip
def test_a_flag_out_of_range_is_refused_before_loading(capsys, flag, value):
    """--port 99999 was a bind() traceback after loading; --max-model-len 0 silently meant the
    default; --request-timeout 0 timed out every request."""
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--model", "/nonexistent", flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_two_images_are_refused(capsys, tmp_path, tiny_checkpoints, image_file):
    part = {"type": "image_url", "image_url": {"url": str(image_file)}}
    messages = [{"role": "user", "content": [part, part, {"type": "text", "text": "Compare"}]}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(messages))
    assert main(["generate", "--model", str(tiny_checkpoints[1]), "--messages", str(path)]) == 2
    assert "at most one image" in capsys.readouterr().err


def test_console_script_init_tiny_and_generate(tmp_path):
    folder = tmp_path / "tiny"
    cli = [sys.executable, "-c", "from server.cli import main; raise SystemExit(main())"]
    subprocess.run([*cli, "init-tiny", str(folder), "--generation", "2"], check=True, capture_output=True)
    done = subprocess.run(
        [*cli, "generate", "--model", str(folder), "--prompt", "Hi", "--max-tokens", "3", "--json"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert json.loads(done.stdout)["finish_reason"] in ("stop", "length")


def test_generate_goes_through_the_engine_and_matches_the_reference(capsys, tiny_checkpoint, image_file):
    from model.generation import GenerationParams, generate_reference
    from model.processor import open_image
    from model.weights import load_model

    out = run_json(
        capsys,
        "--model",
        str(tiny_checkpoint),
        "--prompt",
        "Describe the picture.",
        "--image",
        str(image_file),
        "--max-tokens",
        "6",
        "--max-num-batched-tokens",
        "7",
    )
    cfg = CogVLMConfig.from_checkpoint(tiny_checkpoint)
    processor = Processor(load_tokenizer(tiny_checkpoint), cfg)
    inputs = processor.build(Conversation(query="Describe the picture.", image=open_image(image_file)))
    want = generate_reference(load_model(tiny_checkpoint), inputs, GenerationParams(max_tokens=6))
    assert out["output_token_ids"] == want.output_token_ids


@pytest.mark.parametrize(
    "flag, want", [([], None), (["--async-scheduling", "on"], True), (["--async-scheduling", "off"], False)]
)
def test_async_scheduling_flag(flag, want):
    from server.cli import build_parser, engine_config

    args = build_parser().parse_args(["serve", "--model", "m", *flag])
    assert engine_config(args).async_scheduling is want


def test_one_row_gemv_pdl_and_tuned_configs_are_on_unless_turned_off():
    from server.cli import build_parser, engine_config

    parser = build_parser()
    default = engine_config(parser.parse_args(["serve", "--model", "m"]))
    assert default.one_row_gemv is True and default.pdl is True and default.pin_tuned_gemvs is True
    off = engine_config(parser.parse_args(["serve", "--model", "m", "--no-one-row-gemv", "--no-pdl",
                                           "--no-tuned-gemv-configs"]))  # fmt: skip
    assert off.one_row_gemv is False and off.pdl is False and off.pin_tuned_gemvs is False


def test_expert_kernels_tune_at_start_unless_skipped():
    from server.cli import build_parser, engine_config

    parser = build_parser()
    assert engine_config(parser.parse_args(["serve", "--model", "m"])).tune_expert_kernels is True
    skipped = engine_config(parser.parse_args(["serve", "--model", "m", "--skip-kernel-tuning"]))
    assert skipped.tune_expert_kernels is False


def test_expert_rows_flag():
    from server.cli import build_parser, engine_config

    parser = build_parser()
    assert engine_config(parser.parse_args(["serve", "--model", "m"])).expert_rows == "gathered"
    grouped = engine_config(parser.parse_args(["serve", "--model", "m", "--expert-rows", "grouped"]))
    assert grouped.expert_rows == "grouped"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--model", "m", "--expert-rows", "sorted"])


def test_the_tokenizer_info_endpoint_is_off_unless_asked_for():
    from server.cli import build_parser, serve_config

    parser = build_parser()
    assert serve_config(parser.parse_args(["serve", "--model", "m"])).server.enable_tokenizer_info is False
    on = serve_config(parser.parse_args(["serve", "--model", "m", "--enable-tokenizer-info-endpoint"]))
    assert on.server.enable_tokenizer_info is True
