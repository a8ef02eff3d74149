"""kohya's Hugging Face Hub flags: upload what a run saves (`--huggingface_repo_id`, `--huggingface_repo_type`,
`--huggingface_path_in_repo`, `--huggingface_token`, `--huggingface_repo_visibility`, `--save_state_to_huggingface`,
`--async_upload`) and resume from a state kept there (`--resume_from_huggingface`), through huggingface_hub.

As in kohya, a failed upload is logged and training goes on: every file is saved locally first, so nothing is lost,
and the message names the file to upload by hand. Unlike kohya, asynchronous uploads run one at a time in a
background thread and the run waits for them before it ends (kohya's fire-and-forget threads can be cut off when
the process exits), and a missing repository is created with `exist_ok` (no check-then-create race).
"""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")


@dataclass(frozen=True)
class HubSettings:
    repo_id: str
    repo_type: str = "model"
    path_in_repo: str | None = None  # a folder in the repository (default: its root)
    token: str | None = None  # default: huggingface_hub's own login (HF_TOKEN, `huggingface-cli login`)
    private: bool = True  # kohya: private unless --huggingface_repo_visibility public
    upload_states: bool = False  # --save_state_to_huggingface
    asynchronous: bool = False  # --async_upload


def add_hub_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Hugging Face Hub (kohya's flags)")
    g.add_argument("--huggingface_repo_id", default=None, help="upload every saved model file to this repository")
    g.add_argument("--huggingface_repo_type", default=None, choices=REPO_TYPES, help="default: model")
    g.add_argument("--huggingface_path_in_repo", default=None, help="the folder in the repository (default: root)")
    g.add_argument("--huggingface_token", default=None,
                   help="access token (default: huggingface_hub's login; on the command line it is visible to other "
                        "users of the machine)")
    g.add_argument("--huggingface_repo_visibility", default=None, choices=["public", "private"],
                   help="for a repository created by the upload: private unless 'public' (kohya's default)")
    g.add_argument("--save_state_to_huggingface", action="store_true",
                   help="also upload the --save_state folders")
    g.add_argument("--resume_from_huggingface", action="store_true",
                   help="--resume names a state in a repository: {repo_id}/{path_in_repo}:{revision}:{repo_type} "
                        "(revision and type optional)")
    g.add_argument("--async_upload", action="store_true",
                   help="upload in the background while training goes on (the run waits for them at its end)")


def hub_settings(args: argparse.Namespace) -> HubSettings | None:
    """The upload settings of the flags, or None without --huggingface_repo_id; flags that need it are refused
    without it."""
    repo_id = getattr(args, "huggingface_repo_id", None)
    if not repo_id:
        needing = [flag for flag in ("--huggingface_repo_type", "--huggingface_path_in_repo",
                                     "--huggingface_repo_visibility", "--save_state_to_huggingface", "--async_upload")
                   if getattr(args, flag[2:], None)]
        if needing:
            raise ValueError(f"{', '.join(needing)}: needs --huggingface_repo_id (the repository to upload to)")
        return None
    return HubSettings(repo_id=repo_id, repo_type=args.huggingface_repo_type or "model",
                       path_in_repo=args.huggingface_path_in_repo, token=args.huggingface_token,
                       private=args.huggingface_repo_visibility != "public",
                       upload_states=args.save_state_to_huggingface, asynchronous=args.async_upload)


class HubUploader:
    """Uploads saved files and folders; `close()` waits for background uploads. `api`: a huggingface_hub.HfApi (or
    a stand-in with create_repo / upload_file / upload_folder, as the tests use)."""

    def __init__(self, settings: HubSettings, api=None):
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi(token=settings.token)
        self.settings, self.api = settings, api
        self._repo_ready = False
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hub-upload") if settings.asynchronous else None
        self._pending: list[Future] = []

    def model_saved(self, path: Path) -> None:
        self._submit(path)

    def state_saved(self, folder: Path) -> None:
        if self.settings.upload_states:
            self._submit(folder)

    def wait(self) -> None:
        """Until the background uploads are done (before old saves are pruned, and at the end of the run)."""
        for future in self._pending:
            future.result()  # _upload logs its own failures; this only waits
        self._pending.clear()

    def close(self) -> None:
        self.wait()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _submit(self, path: Path) -> None:
        if self._pool is None:
            self._upload(Path(path))
        else:
            self._pending.append(self._pool.submit(self._upload, Path(path)))

    def _target(self, path: Path) -> str:
        return f"{self.settings.path_in_repo.strip('/')}/{path.name}" if self.settings.path_in_repo else path.name

    def _upload(self, path: Path) -> None:
        s = self.settings
        try:
            if not self._repo_ready:
                self.api.create_repo(s.repo_id, repo_type=s.repo_type, private=s.private, exist_ok=True)
                self._repo_ready = True
            if path.is_dir():
                self.api.upload_folder(repo_id=s.repo_id, repo_type=s.repo_type, folder_path=str(path),
                                       path_in_repo=self._target(path))
            else:
                self.api.upload_file(repo_id=s.repo_id, repo_type=s.repo_type, path_or_fileobj=str(path),
                                     path_in_repo=self._target(path))
            logger.info("uploaded %s to %s/%s", path.name, s.repo_id, self._target(path))
        except Exception as e:  # network, auth, quota, offline mode: the local file is complete either way
            logger.error("upload of %s to the Hugging Face repository %s failed (%s: %s); the file is saved at %s: "
                         "upload it by hand (huggingface-cli upload %s %s %s)", path.name, s.repo_id,
                         type(e).__name__, e, path, s.repo_id, path, self._target(path))


@dataclass(frozen=True)
class HubStateRef:
    repo_id: str
    path_in_repo: str
    revision: str = "main"
    repo_type: str = "model"


def parse_hub_state(text: str) -> HubStateRef:
    """kohya's --resume form with --resume_from_huggingface: {repo_id}/{path_in_repo}:{revision}:{repo_type}, where
    repo_id is owner/name."""
    location, *rest = text.split(":")
    parts = location.split("/")
    if len(parts) < 3 or not all(parts) or len(rest) > 2:
        raise ValueError(f"--resume {text}: with --resume_from_huggingface, give {{owner}}/{{repo}}/{{state folder}}"
                         "[:{revision}[:{repo_type}]], e.g. me/my-lora/last-state:main:model")
    revision = rest[0] if rest and rest[0] else "main"
    repo_type = rest[1] if len(rest) > 1 and rest[1] else "model"
    if repo_type not in REPO_TYPES:
        raise ValueError(f"--resume {text}: repository type {repo_type!r}; use one of {', '.join(REPO_TYPES)}")
    return HubStateRef("/".join(parts[:2]), "/".join(parts[2:]), revision, repo_type)


def download_state(ref: HubStateRef, token: str | None, into: Path, download=None) -> Path:
    """The state folder downloaded under `into`, for --resume. `download`: huggingface_hub.snapshot_download (or a
    stand-in); offline or unreachable hubs get a message saying so."""
    if download is None:
        from huggingface_hub import snapshot_download as download
    try:
        root = download(ref.repo_id, repo_type=ref.repo_type, revision=ref.revision, token=token,
                        local_dir=str(into), allow_patterns=[f"{ref.path_in_repo}/*"])
    except Exception as e:
        raise ValueError(f"--resume {ref.repo_id}/{ref.path_in_repo} (--resume_from_huggingface): the state cannot "
                         f"be downloaded ({type(e).__name__}: {e}); check the name, the network (HF_HUB_OFFLINE "
                         "must be unset) and the token, or download the folder and --resume it locally") from None
    folder = Path(root) / ref.path_in_repo
    if not folder.is_dir():
        raise ValueError(f"--resume {ref.repo_id}/{ref.path_in_repo}: the repository has no such folder")
    return folder
