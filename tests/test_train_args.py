"""kohya-compatible argument parsing: --config_file merging (command line wins), --output_config, refusals."""

from __future__ import annotations

import argparse

import pytest
import toml

from library import train_args


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    train_args.add_common_training_arguments(p)
    return p


REQUIRED = ["--pretrained_model_name_or_path", "m.safetensors", "--output_dir", "out"]


def test_defaults_follow_kohya():
    args = train_args.parse_args(parser(), REQUIRED)
    assert args.caption_extension == ".caption" and args.max_train_steps == 1600 and args.learning_rate == 2e-6
    assert args.min_bucket_reso == 256 and args.max_bucket_reso == 1024 and args.bucket_reso_steps == 64
    assert args.lr_scheduler == "constant" and args.loss_type == "l2" and args.huber_schedule == "snr"


def test_config_file_sections_are_flattened_and_the_command_line_wins(tmp_path):
    config = tmp_path / "train.toml"
    config.write_text(toml.dumps({
        "model": {"pretrained_model_name_or_path": "from_file.safetensors"},
        "training": {"output_dir": "file_out", "max_train_steps": 10, "learning_rate": 1e-4},
        "seed": 42,
    }))
    args = train_args.parse_args(parser(), ["--config_file", str(config), "--max_train_steps", "20"])
    assert args.pretrained_model_name_or_path == "from_file.safetensors"
    assert (args.max_train_steps, args.learning_rate, args.seed) == (20, 1e-4, 42)


def test_config_file_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("max_train_steps = = 3")
    with pytest.raises(SystemExit, match="invalid TOML"):
        train_args.parse_args(parser(), REQUIRED + ["--config_file", str(bad)])
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("learning_rat = 1.0\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        train_args.parse_args(parser(), REQUIRED + ["--config_file", str(unknown)])
    with pytest.raises(SystemExit, match="no such file"):
        train_args.parse_args(parser(), REQUIRED + ["--config_file", str(tmp_path / "missing.toml")])


def test_output_config_writes_the_non_default_arguments(tmp_path):
    config = tmp_path / "out.toml"
    with pytest.raises(SystemExit) as info:
        train_args.parse_args(parser(), REQUIRED + ["--learning_rate", "1e-4", "--config_file", str(config),
                                                    "--wandb_api_key", "secret", "--output_config"])
    assert info.value.code == 0
    written = toml.loads(config.read_text())  # the API key is left out (kohya does the same)
    assert written == {"pretrained_model_name_or_path": "m.safetensors", "output_dir": "out", "learning_rate": 1e-4}
    args = train_args.parse_args(parser(), ["--config_file", str(config)])
    assert args.learning_rate == 1e-4 and args.output_dir == "out"


def test_unimplemented_kohya_flags_are_refused_by_name():
    with pytest.raises(SystemExit, match="--face_crop_aug_range"):
        train_args.parse_args(parser(), REQUIRED + ["--face_crop_aug_range", "2.0,4.0"])
    with pytest.raises(SystemExit, match="--cache_text_encoder_outputs"):
        train_args.parse_args(parser(), REQUIRED + ["--cache_text_encoder_outputs"])
    # A trainer that implements one of them parses it as its own flag (train_network: the text-encoder cache);
    # the others stay refused there.
    import train_network

    args = train_args.parse_args(train_network.setup_parser(), REQUIRED + ["--cache_text_encoder_outputs"])
    assert args.cache_text_encoder_outputs is True
    with pytest.raises(SystemExit, match="--dataset_class: not implemented: kohya's hook for a Python dataset class"):
        train_args.parse_args(train_network.setup_parser(), REQUIRED + ["--dataset_class", "my.Dataset"])
    with pytest.raises(SystemExit, match="--fp8_base: this trainer trains the U-Net itself"):
        train_args.parse_args(parser(), REQUIRED + ["--fp8_base"])
    import sdxl_train

    args = train_args.parse_args(sdxl_train.setup_parser(), REQUIRED + ["--fused_optimizer_groups", "4"])
    assert args.fused_optimizer_groups == 4


def test_cpu_offload_checkpointing_is_refused_with_the_reason():
    args = train_args.parse_args(parser(), REQUIRED + ["--cpu_offload_checkpointing", "--gradient_checkpointing"])
    with pytest.raises(SystemExit, match="--cpu_offload_checkpointing: offloads the checkpointed activations of "
                                         "kohya's FLUX / SD3"):
        train_args.check_training_flags(args)


def test_misspelled_caption_extension_alias():
    args = train_args.parse_args(parser(), REQUIRED + ["--caption_extention", ".txt"])
    assert args.caption_extension == ".txt"


def test_log_settings(tmp_path):
    tracker = tmp_path / "tracker.toml"
    tracker.write_text('[wandb]\nentity = "team"\ntags = ["a"]\n')
    args = train_args.parse_args(parser(), REQUIRED + ["--logging_dir", str(tmp_path / "logs"), "--log_prefix", "x_",
                                                       "--log_with", "all", "--log_tracker_config", str(tracker),
                                                       "--log_config", "--wandb_api_key", "secret"])
    settings = train_args.log_settings(args, default_project="network_train", output_dir=tmp_path / "out")
    assert settings.backends == ("tensorboard", "wandb") and settings.project == "network_train"
    assert settings.logging_dir.parent == tmp_path / "logs" and settings.logging_dir.name.startswith("x_")
    assert settings.wandb_init == {"entity": "team", "tags": ["a"]} and settings.api_key == "secret"
    # --log_config records settings, never secrets or local paths.
    assert settings.config["learning_rate"] == args.learning_rate
    assert not {"wandb_api_key", "output_dir", "logging_dir", "pretrained_model_name_or_path"} & set(settings.config)
    plain = train_args.parse_args(parser(), REQUIRED + ["--logging_dir", str(tmp_path / "logs")])
    assert train_args.log_settings(plain, default_project="p", output_dir=tmp_path).backends == ("tensorboard",)
    assert train_args.log_settings(train_args.parse_args(parser(), REQUIRED), default_project="p",
                                   output_dir=tmp_path) is None


def test_console_log_level_and_file(tmp_path):
    """kohya's --console_log_level sets the root logger's level; --console_log_file adds a file with the log."""
    import logging

    root = logging.getLogger()
    before_level, before_handlers = root.level, list(root.handlers)
    log = tmp_path / "run.log"
    try:
        args = train_args.parse_args(parser(), REQUIRED + ["--console_log_level", "debug", "--console_log_file",
                                                            str(log), "--console_log_simple"])
        assert args.console_log_level == "DEBUG" and root.level == logging.DEBUG
        logging.getLogger("library.some_module").debug("a debug line")
        for handler in root.handlers:
            handler.flush()
        assert "DEBUG library.some_module: a debug line" in log.read_text()
    finally:
        for handler in set(root.handlers) - set(before_handlers):
            root.removeHandler(handler)
            handler.close()
        root.setLevel(before_level)
    with pytest.raises(SystemExit, match="--console_log_file .*: cannot open it"):
        train_args.parse_args(parser(), REQUIRED + ["--console_log_file", str(tmp_path / "no" / "such" / "x.log")])
