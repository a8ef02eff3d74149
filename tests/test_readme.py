"""The README as executable evidence: every ```bash block of README.md is run, in README order, in one working
directory that stands for the repository root.

- **Try it here** blocks (the paragraph before the block starts with `**Try it here**`) run verbatim: they use the
  tiny model and synthetic images that the first of them makes under `out/`.
- The GPU-sized examples run with only what a user would swap made real: the files they name exist in the working
  directory as tiny stand-ins (`v1-5-pruned-emaonly.safetensors` is a tiny SD 1.x model, `data/10_sks dog/` holds a
  synthetic captioned image, ...; see tests/readme_stand_ins.py), `accelerate launch` is `python`, and the flags in
  `SHRINK` are overridden (steps, epochs, resolution, class images, sampling steps, image size).
- `SKIP` lists, with the reason, the blocks that cannot run here.

A block fails its test with the block as run and the tail of its stderr. Files a block is documented to write are
checked in `EXPECTED`.

Speed: each of the README's ~60 commands would spend ~5 s importing torch/diffusers in a fresh interpreter. The
`python` on the blocks' PATH is instead a 20 ms client of `tests/readme_runner.py`, which forks each command from a
process that has those imports done (set README_TEST_COLD=1 to use the real interpreter for every command). The
commands run with OMP_NUM_THREADS=1: the tiny models are overhead-bound, and on a shared 2-core machine spinning
OpenMP threads make a step ten times slower.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
RUNNER = Path(__file__).resolve().parent / "readme_runner.py"
BLOCK_TIMEOUT_S = 300

# Blocks that cannot run inside the test, keyed by their exact text.
SKIP = {
    "bash quickstart.sh": "fresh-machine command: installs .venv and runs the whole quickstart (run by hand / CI)",
    "bash scripts/run_tests.sh": "fresh-machine command: runs this whole test suite",
    # Two machines, each waiting for the other: run on one host by
    # tests/test_train_network.py::test_two_machines_train_together_as_one_process.
    "# on machine 0 (address 10.0.0.1)\n"
    "accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \\\n"
    "  --main_process_ip 10.0.0.1 --main_process_port 29500 train_network.py --config_file my_lora.toml\n"
    "# on machine 1\n"
    "accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 1 \\\n"
    "  --main_process_ip 10.0.0.1 --main_process_port 29500 train_network.py --config_file my_lora.toml":
        "several machines: each command waits for the other machine's",
}

# The GPU-sized examples' flags that are shrunk here; nothing else in a block is changed.
SHRINK = {
    "--max_train_steps": "2",
    "--max_train_epochs": "1",
    "--resolution": "64",  # "512,512" becomes "64,64"
    "--max_resolution": "64",
    "--min_bucket_reso": "64",  # must not exceed the resolution
    "--num_class_images": "2",
    "--steps": "2",
    "--W": "64",
    "--H": "64",
}
# Kohya's default --min_bucket_reso (256) exceeds the shrunk resolution: set it where buckets are made.
BUCKET_FLAGS = ("--enable_bucket", "--max_resolution")
# The per-line options of the README's example prompt file, shrunk the same way.
PROMPT_SHRINK = {"--w": "64", "--h": "64", "--s": "2"}

# What a block is documented to write (globs, relative to the working directory), keyed by a line of the block.
EXPECTED = {
    "python tools/make_synthetic_dataset.py out/data --images 4 --size 64 --reg": [
        "out/tiny.safetensors", "out/data/10_sks shape/000.png", "out/data/10_sks shape/000.caption",
        "out/data_reg/1_shape/000.png", "out/prompts.txt"],
    "python tools/add_input_channels.py --extra_channels 3 out/tiny.safetensors out/tiny_3ch.safetensors": [
        "out/tiny_inpainting.safetensors", "out/tiny_inpainting_diffusers/unet/config.json",
        "out/tiny_3ch.safetensors"],
    "python tools/make_synthetic_dataset.py out/inpaint_data --images 4 --size 64 --masks out/inpaint_masks": [
        "out/inpaint_masks/000.png", "out/inpaint/tiny_inpaint.safetensors", "out/inpainted/*.png"],
    "python tools/make_synthetic_dataset.py out/edge_data --images 4 --size 64 --edge_maps out/edge_maps": [
        "out/edge_maps/000.png", "out/tiny_edges.safetensors", "out/edges/tiny_edges_lora.safetensors",
        "out/edge_images/*.png"],
    "python networks/convert_oft.py --model out/net/tiny_oft.safetensors --save_to out/net/tiny_oft_comfy.safetensors": [
        "out/net/tiny_dylora.safetensors", "out/net/tiny_cut-0002.safetensors", "out/net/tiny_oft.safetensors",
        "out/net/tiny_oft_comfy.safetensors"],
    "  --outdir out/net_images": ["out/net_images/*.png"],
    "python train_network.py --config_file out/lora.toml": [
        "out/lora.toml", "out/lora/tiny_lora.safetensors", "out/lora/tiny_lora-step00000004.safetensors",
        "out/lora/tiny_lora-step00000004-state/*", "out/lora/tiny_lora-state/*", "out/lora/sample/*.png",
        "out/logs/*/events.out.tfevents.*", "out/lora/tiny_lora_resumed.safetensors"],
    "  --max_train_steps 4 --train_batch_size 2 --cache_latents --seed 42 \\": [
        "out/tiny_sdxl.safetensors", "out/lora_xl/tiny_xl_lora.safetensors", "out/lora_xl/sample/*.png"],
    "  --W 64 --H 64 --steps 4 --outdir out/cttoy_images": [
        "out/cttoy/20_cttoy toy/000.caption", "out/cttoy_hf/photos/metadata.jsonl", "out/cttoy_lora/cttoy.safetensors",
        "out/cttoy_lora/cttoy_diffusers.safetensors", "out/cttoy_lora_diffusers/pytorch_lora_weights.safetensors",
        "out/cttoy_on_a_beach.png", "out/cttoy_images/*.png"],
    "  --network_train_unet_only --cache_latents --cache_text_encoder_outputs --gradient_checkpointing \\": [
        "output/cttoy.safetensors", "output/cttoy_diffusers.safetensors"],
    "  --max_train_steps 2 --train_batch_size 2 --cache_latents --save_model_as safetensors": [
        "out/sdxl_ft/tiny_sdxl_ft.safetensors"],
    "  --cache_latents --cache_text_encoder_outputs --max_train_steps 1600 --save_every_n_steps 400": [
        "output/sks_dog_sdxl.safetensors"],
    "  --no_half_vae --cache_latents --gradient_checkpointing --save_every_n_epochs 2 --seed 42": [
        "output/sks_dog_xl.safetensors"],
    "  --max_train_steps 4 --use_ema --save_every_n_steps 2": [
        "out/ft_images/000_64x64_sd_latents.safetensors", "out/meta_lat.json", "out/ft/tiny_ft.safetensors",
        "out/ft/tiny_ft-step00000002.safetensors"],
    "  --stop_text_encoder_training 2 --max_train_steps 4 --train_batch_size 1 --cache_latents \\": [
        "out/class/1_shape/class_0000[01].png", "out/db/tiny_db.safetensors", "out/db/tiny_db-step00000002.safetensors",
        "out/db/tiny_db-step00000002-state/*", "out/db/tiny_db-state/*"],
    "  --output_name shapes_canny --resolution 64 --learning_rate 1e-5 --max_train_steps 4 --train_batch_size 2 \\": [
        "out/edges/000.png", "out/controlnet/shapes_canny.safetensors", "out/controlnet/shapes_canny_diffusers/*",
        "out/controlnet/shapes_canny-step00000002.safetensors", "out/controlnet/validation/*.png"],
    "  --cache_latents --cache_text_encoder_outputs --validation_image out/edges/000.png \\": [
        "out/controlnet_xl/shapes_canny_xl.safetensors", "out/controlnet_xl/shapes_canny_xl_diffusers/*",
        "out/controlnet_xl/validation/*.png"],
    "  --max_train_steps 4 --train_batch_size 2 --save_model_as safetensors": ["out/ti/shapetok.safetensors"],
    "  --max_train_steps 4 --train_batch_size 2 --cache_latents --no_half_vae --save_model_as safetensors": [
        "out/ti_xl/shapetok_xl.safetensors"],
    "  --train_batch_size 2 --cache_latents \\": [
        "out/pivotal/tiny_zwxq.safetensors", "out/pivotal/tiny_zwxq_embeddings/zwxq.safetensors"],
    "  --prompt \"sks shape, an oil painting\"": ["out/images/im_00000[0-6]_*.png"],
    "python tools/compare_models.py out/tiny.safetensors out/tiny_roundtrip.safetensors": [
        "out/tiny_diffusers/unet/*.safetensors", "out/tiny_roundtrip.safetensors"],
    "python tools/show_metadata.py --model out/extracted.safetensors": [
        "out/tiny_merged.safetensors", "out/tiny_lora_r2.safetensors", "out/extracted.safetensors"],
    # GPU-sized examples
    "  --save_every_n_epochs 2 --save_state --logging_dir logs --seed 42": ["output/sks_dog.safetensors",
                                                                            "output/sks_dog-state/*"],
    "  --optimizer_type AdamW8bit --cache_latents --save_every_n_steps 200 --save_state": [
        "reg/1_dog/class_00000.png", "output/sks_dog_db.safetensors"],
    "  --use_ema --ema_decay 0.9999 --mixed_precision bf16 --gradient_checkpointing --save_every_n_epochs 2": [
        "meta_lat.json", "output/my_style.safetensors"],
    "  --checkpointing_steps 5000 --checkpoints_total_limit 2 --report_to tensorboard --logging_dir logs": [
        "edges/img001.png", "output/dog_canny.safetensors", "output/dog_canny_diffusers/*"],
    "  --validation_prompt \"sks dog in a garden\" --validation_steps 1000 --checkpointing_steps 5000": [
        "output/dog_canny_xl.safetensors", "output/dog_canny_xl_diffusers/*"],
    "  --mixed_precision bf16 --cache_latents --save_every_n_steps 500 --save_model_as safetensors": [
        "output/mychar.safetensors"],
    "  --pivotal_token mychar --pivotal_init_word girl --pivotal_num_vectors 2 --pivotal_lr 5e-3 --pivotal_steps 300": [
        "output/mychar_lora.safetensors", "output/mychar_lora_embeddings/mychar.safetensors"],
    "  --prompt \"an oil painting\"": [
        "outputs/im_00000[0-9]_*.png"],
    "python tools/convert_diffusers20_original_sd.py sd-v1-4-full-ema.ckpt sd14_ema.safetensors --extract_ema": [
        "model_diffusers/unet/*", "model_fp16.safetensors", "sd14_ema.safetensors"],
    "python networks/check_lora_weights.py output/sks_dog.safetensors": [
        "v1-5_style_char.safetensors", "ab.safetensors", "ab_cat.safetensors", "ab_r32.safetensors",
        "r16.safetensors", "dyn.safetensors", "extracted.safetensors", "merged.safetensors"],
}


# ----------------------------------------------------------------------------------------------- the README


@dataclasses.dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    section: str  # the nearest heading above
    lead: str  # the paragraph just above the block
    text: str

    @property
    def kind(self) -> str:
        if self.text.strip() in SKIP:
            return "skip"
        return "try" if self.lead.startswith("**Try it here**") else "example"

    @property
    def id(self) -> str:
        words = re.findall(r"([\w-]+)\.(?:py|sh)\b", self.text)
        return f"L{self.line}-{self.kind}-{words[0] if words else 'shell'}"


def readme_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks, section, i = [], "", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            section = line.lstrip("#").strip()
        elif line.startswith("```") and line.strip() != "```bash":  # another fenced block: not a command
            i = lines.index("```", i + 1)
        elif line.strip() == "```bash":
            end = lines.index("```", i + 1)
            start = i - 1
            while start >= 0 and not lines[start].strip():
                start -= 1
            lead_end = start
            while start >= 0 and lines[start].strip() and not lines[start].startswith(("```", "#")):
                start -= 1
            lead = " ".join(lines[start + 1:lead_end + 1])
            blocks.append(Block(i + 1, section, lead, "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))


def shrink(block_text: str) -> str:
    """A GPU-sized example as run here: `accelerate launch` -> `python`, the SHRINK flags overridden."""
    commands = re.split(r"(?<!\\)\n", block_text)
    out = []
    for command in commands:
        if not command.lstrip().startswith(("python ", "accelerate launch ")):
            out.append(command)
            continue
        command = re.sub(r"^(\s*)accelerate launch\s+", r"\1python ", command)
        for flag, value in SHRINK.items():
            def new_value(match: re.Match, value=value) -> str:
                parts = match.group(2).split(",")
                return f"{match.group(1)}{','.join(value for _ in parts)}"
            command = re.sub(rf"(?<!\S)({re.escape(flag)}\s+)([0-9][0-9,.]*)(?!\S)", new_value, command)
        if any(re.search(rf"(?<!\S){f}(?!\S)", command) for f in BUCKET_FLAGS) and "--min_bucket_reso" not in command:
            command = command.rstrip() + f" --min_bucket_reso {SHRINK['--min_bucket_reso']}"
        out.append(command)
    return "\n".join(out)


def example_prompt_line() -> str:
    """The prompt-file line the gen_img section shows (`#   <prompt> --n ... --am ...`), shrunk."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^# a prompt file:.*\n#\s+(\S.*)$", text, re.MULTILINE)
    assert match, "README: the gen_img prompt-file example line ('# a prompt file: ...' then '#   <prompt>')"
    line = match.group(1)
    for flag, value in PROMPT_SHRINK.items():
        line = re.sub(rf"(?<!\S){re.escape(flag)}\s+\S+", f"{flag} {value}", line)
    return line + "\n"


# ------------------------------------------------------------------------------------ the working directory


@pytest.fixture(scope="module")
def python_on_path(tmp_path_factory):
    """The environment for the blocks: a `python` on PATH that runs a command as the venv's python would (warm, or
    cold with README_TEST_COLD=1). The warm server is started here and waited for on first use."""
    bin_dir = tmp_path_factory.mktemp("readme_bin")
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    shim = bin_dir / "python"
    server = None
    socket_dir = tempfile.mkdtemp(prefix="readme_py")  # AF_UNIX paths must be short
    try:
        if os.environ.get("README_TEST_COLD"):
            shim.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
        else:
            env["README_PY_SOCKET"] = os.path.join(socket_dir, "s")
            log = open(os.path.join(socket_dir, "server.log"), "w+")  # noqa: SIM115
            server = subprocess.Popen([sys.executable, str(RUNNER), "serve", env["README_PY_SOCKET"]], env=env,
                                      stdout=log, stderr=log, start_new_session=True)
            client = f"{shlex.quote(sys.executable)} -S {shlex.quote(str(RUNNER))} client"  # -S: stdlib only, fast
            shim.write_text(f'#!/bin/sh\nexec {client} "$@"\n')
        shim.chmod(0o755)
        yield env
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)  # the server and any command it still runs
            server.wait()
            log.close()
        shutil.rmtree(socket_dir, ignore_errors=True)


def wait_until_ready(env: dict[str, str]) -> None:
    """Block until the warm server accepts connections (it prints nothing else; a dead server fails here)."""
    import socket
    import time

    path = env.get("README_PY_SOCKET")
    deadline = time.monotonic() + 180
    while path:
        try:
            with socket.socket(socket.AF_UNIX) as probe:
                probe.connect(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"tests/readme_runner.py did not start; see {Path(path).parent / 'server.log'}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, python_on_path):
    """A folder that stands for the repository root: the code linked in, the stand-ins beside it."""
    root = tmp_path_factory.mktemp("readme_root")
    for entry in REPO.iterdir():
        if entry.suffix == ".py" or entry.name in ("library", "networks", "tools", "finetune"):
            (root / entry.name).symlink_to(entry)
    (root / "prompts.txt").write_text(example_prompt_line(), encoding="utf-8")
    wait_until_ready(python_on_path)
    made = subprocess.run(["python", str(REPO / "tests" / "readme_stand_ins.py"), str(root)], cwd=root,
                          env=python_on_path, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    assert made.returncode == 0, f"tests/readme_stand_ins.py failed:\n{made.stderr[-4000:]}"
    return root


# -------------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class Outcome:
    script: str
    returncode: int
    stderr: str


class Runner:
    """Runs the blocks in README order, once each; a test asks for its block (earlier blocks run first)."""

    def __init__(self, workspace: Path, env: dict[str, str]):
        self.workspace, self.env, self.done = workspace, env, {}

    def outcome(self, index: int) -> Outcome:
        for i in range(index + 1):
            if i not in self.done and BLOCKS[i].kind != "skip":
                self.done[i] = self._run(BLOCKS[i])
        return self.done[index]

    def _run(self, block: Block) -> Outcome:
        script = block.text if block.kind == "try" else shrink(block.text)
        logs = self.workspace.parent / f"{block.id}.log"
        with open(logs, "w+") as err, open(os.devnull, "w") as out:
            shell = subprocess.Popen(["bash", "-c", "set -eo pipefail\nPS4='+ [$SECONDS s] $ '\nset -x\n" + script],
                                     cwd=self.workspace, env=self.env, stdout=out, stderr=err, start_new_session=True)
            try:
                code = shell.wait(timeout=BLOCK_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(shell.pid, signal.SIGKILL)  # bash and its `python` clients; the server stops their commands
                shell.wait()
                code = -1
            err.seek(0)
            return Outcome(script, code, err.read())


@pytest.fixture(scope="module")
def runner(python_on_path, workspace):
    return Runner(workspace, python_on_path)


def readable_tail(stderr: str, limit: int = 6000) -> str:
    """stderr without progress-bar redraws and diffusers' scheduler-config dumps, last `limit` characters."""
    lines = [line for line in stderr.replace("\r", "\n").splitlines()
             if line.strip() and not re.search(r"\d+/\d+ \[|it/s\]|s/it\]|step/s|s/step|image/s", line)]
    return "\n".join(lines)[-limit:]


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[b.id for b in BLOCKS])
def test_readme_block(index, runner):
    block = BLOCKS[index]
    if block.kind == "skip":
        pytest.skip(SKIP[block.text.strip()])
    result = runner.outcome(index)
    where = f"README.md line {block.line} ({block.section}), {block.kind} block"
    if result.returncode != 0:
        status = "timed out" if result.returncode == -1 else f"exit status {result.returncode}"
        pytest.fail(f"{where}: {status}\n--- block as run ---\n{result.script}\n--- stderr (tail) ---\n"
                    f"{readable_tail(result.stderr)}", pytrace=False)
    for key, patterns in EXPECTED.items():
        if key in block.text.splitlines():
            missing = [p for p in patterns if not glob.glob(str(runner.workspace / p))]
            assert not missing, f"{where}: documented outputs missing: {missing}"


# --------------------------------------------------------------------------------------- the README's shape


def test_fresh_machine_section_has_exactly_the_two_commands():
    fresh = [b for b in BLOCKS if b.section.startswith("Fresh machine")]
    assert [b.text.strip() for b in fresh] == ["bash quickstart.sh", "bash scripts/run_tests.sh"]


def test_every_block_is_run_or_skipped_for_a_reason():
    texts = [b.text.strip() for b in BLOCKS]
    assert set(SKIP) <= set(texts), f"SKIP entries that match no README block: {set(SKIP) - set(texts)}"
    for key in EXPECTED:
        holders = [b.id for b in BLOCKS if key in b.text.splitlines()]
        assert len(holders) == 1, f"EXPECTED key {key!r} must be a line of exactly one block, found in {holders}"
    for block in BLOCKS:
        if block.kind == "try":
            assert "accelerate launch" not in block.text and "out/" in block.text, block.id
        if block.kind != "skip":
            assert "--multi_gpu" not in block.text and "pip install" not in block.text, \
                f"{block.id}: not runnable here; add it to SKIP with the reason"
    tried = "".join(b.text for b in BLOCKS if b.kind == "try")
    for command in ("python train_network.py", "python train_db.py", "python fine_tune.py", "finetune/",
                    "python train_controlnet.py", "python train_textual_inversion.py", "--pivotal_token",
                    "python gen_img.py", "tools/convert_diffusers20_original_sd.py", "networks/merge_lora.py"):
        assert command in tried, f"no 'Try it here' block runs {command}"


def test_shrink_overrides_only_the_listed_flags():
    text = ("accelerate launch train_db.py --resolution 512,512 --max_train_steps 800 \\\n"
            "  --learning_rate 1e-6 --enable_bucket\n# --steps 30 in a comment\npython x.py --W 512 --Wx 3\n")
    assert shrink(text) == ("python train_db.py --resolution 64,64 --max_train_steps 2 \\\n"
                            "  --learning_rate 1e-6 --enable_bucket --min_bucket_reso 64\n# --steps 30 in a comment\n"
                            "python x.py --W 64 --Wx 3\n")
