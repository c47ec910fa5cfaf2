"""Getting result files to users: as an attachment when it fits, otherwise as a signed link.

Discord caps uploads per file (10 MiB by default, 50/100 MiB on boosted guilds) and per request
(25 MiB); an SDXL LoRA can be 200 MB. Files that do not fit are served by the bot itself:
``GET /files/{token}`` where the token is an HMAC-SHA256-signed, expiring reference to one artifact
(job id + artifact id + expiry). A token cannot be guessed (256-bit MAC) or altered (any change
breaks the MAC: 403), and stops working at its expiry (410).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
from aiohttp import web

from bot.errors import too_large

log = logging.getLogger("loraforge.delivery")

MiB = 1024 * 1024
DEFAULT_UPLOAD_LIMIT = 10 * MiB  # Discord's per-file limit without boosts
REQUEST_LIMIT = 25 * MiB  # Discord's per-request limit, whatever the per-file one
MAX_FILES_PER_MESSAGE = 10


class LinkError(Exception):
    status = 403


class ForgedLink(LinkError):
    status = 403


class ExpiredLink(LinkError):
    status = 410


@dataclass(frozen=True, slots=True)
class LinkRef:
    job_id: int
    artifact_id: int
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class LinkSigner:
    """Makes and checks ``<job>.<artifact>.<expires>.<mac>`` tokens."""

    def __init__(self, secret: str | bytes, ttl_s: float = 7 * 86400, clock: Callable[[], float] = time.time) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        if len(secret) < 16:
            raise ValueError("the link secret must be at least 16 bytes")
        self._secret = secret
        self.ttl_s = ttl_s
        self._clock = clock

    def _mac(self, body: str) -> str:
        return _b64(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())

    def sign(self, job_id: int, artifact_id: int, ttl_s: float | None = None) -> str:
        expires = int(self._clock() + (self.ttl_s if ttl_s is None else ttl_s))
        body = f"{int(job_id)}.{int(artifact_id)}.{expires}"
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str) -> LinkRef:
        """The reference, or ForgedLink (bad shape or MAC) / ExpiredLink (valid but too old).
        The MAC is checked first, so a forged token never learns whether it would have expired."""
        parts = token.split(".")
        if len(parts) != 4 or not all(p.isdigit() for p in parts[:3]):
            raise ForgedLink("malformed link")
        body = ".".join(parts[:3])
        if not hmac.compare_digest(self._mac(body), parts[3]):
            raise ForgedLink("bad signature")
        ref = LinkRef(int(parts[0]), int(parts[1]), int(parts[2]))
        if self._clock() >= ref.expires:
            raise ExpiredLink("link expired")
        return ref

    def expiry_of(self, token: str) -> int:
        return int(token.split(".")[2])


def load_secret(configured: str | None, env_name: str | None, data_dir: Path | None) -> str:
    """The link secret: from config, else the env var, else a random one kept in the data dir so
    links survive a restart (created 0600)."""
    if configured:
        return configured
    if env_name and os.environ.get(env_name):
        return os.environ[env_name]
    if data_dir is None:
        return secrets.token_urlsafe(32)
    path = Path(data_dir) / "link_secret"
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value


# (job id, artifact id) -> (absolute path, download file name), or None when unknown.
ArtifactResolver = Callable[[int, int], Awaitable[tuple[Path, str] | None]]


class FileServer:
    """The bot's small HTTP server for big files. ``public_base_url`` is what users' browsers reach
    (a reverse proxy in production); by default the bound address."""

    def __init__(
        self,
        signer: LinkSigner,
        resolve: ArtifactResolver,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        public_base_url: str | None = None,
    ) -> None:
        self.signer = signer
        self._resolve = resolve
        self.host, self.port = host, port
        self._public = public_base_url.rstrip("/") if public_base_url else None
        self._runner: web.AppRunner | None = None

    @property
    def base_url(self) -> str:
        return self._public or f"http://{self.host}:{self.port}"

    def url_for(self, job_id: int, artifact_id: int, ttl_s: float | None = None) -> str:
        return f"{self.base_url}/files/{self.signer.sign(job_id, artifact_id, ttl_s)}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/files/{token}", self._get)
        app.router.add_get("/healthz", self._health)
        self._runner = web.AppRunner(app, access_log=None)  # access logs would contain the tokens
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        if self.port == 0:
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("file server listening on %s:%s (public %s)", self.host, self.port, self.base_url)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _get(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        try:
            ref = self.signer.verify(token)
        except LinkError as e:
            return web.Response(status=e.status, text=f"{e}\n")
        found = await self._resolve(ref.job_id, ref.artifact_id)
        if found is None or not found[0].is_file():
            return web.Response(status=404, text="file no longer exists\n")
        path, name = found
        safe = "".join(c for c in name if c.isalnum() or c in "._- ") or "file"
        return web.FileResponse(
            path,
            headers={
                "Content-Disposition": f'attachment; filename="{safe}"',
                "Cache-Control": "private, no-store",
            },
        )


def upload_limit(stored: int | None, guild: discord.Guild | None = None) -> int:
    """The per-file limit for a job's destination: the interaction's ``attachment_size_limit``
    stored with the job, else the guild's, else Discord's default."""
    if stored:
        return int(stored)
    if guild is not None:
        try:
            return int(guild.filesize_limit)
        except Exception:  # noqa: BLE001 - a partial guild has no tier
            pass
    return DEFAULT_UPLOAD_LIMIT


def split_by_request_limit(paths: Sequence[Path], per_file: int) -> tuple[list[Path], list[Path]]:
    """(attach, too big): files over the per-file limit go to links; the rest are attached while the
    request stays under 25 MiB and 10 files."""
    attach: list[Path] = []
    too_big: list[Path] = []
    total = 0
    for p in paths:
        size = p.stat().st_size
        if size > per_file or size > REQUEST_LIMIT:
            too_big.append(p)
        elif total + size <= REQUEST_LIMIT and len(attach) < MAX_FILES_PER_MESSAGE:
            attach.append(p)
            total += size
        else:
            too_big.append(p)
    return attach, too_big


LinkMaker = Callable[[Path], Awaitable[str | None]]


async def send_files(
    dest: discord.abc.Messageable,
    content: str,
    paths: Sequence[Path],
    *,
    limit: int,
    make_link: LinkMaker,
    names: dict[Path, str] | None = None,
    **kwargs: Any,
) -> tuple[discord.Message, list[Path]]:
    """Send ``content`` with the files that fit, and links for those that do not. If Discord refuses
    the upload anyway (413 / 40005: the limit was lower than we thought), resend with links only.
    Returns the message and the paths that went out as links. Raises only when even the text fails."""
    names = names or {}
    attach, linked = split_by_request_limit(paths, limit)
    while True:
        text = content + await _links_text(linked, make_link, names)
        files = [discord.File(p, filename=names.get(p, p.name)) for p in attach]
        try:
            msg = await dest.send(text[:2000], files=files, **kwargs)
            return msg, linked
        except discord.HTTPException as e:
            if not too_large(e) or not attach:
                raise
            # The real limit is lower than we were told: link the biggest file and try again.
            biggest = max(attach, key=lambda p: p.stat().st_size)
            log.info("upload refused as too large; sending %s as a link instead", biggest.name)
            attach.remove(biggest)
            linked.append(biggest)
        finally:
            for f in files:
                f.close()


async def _links_text(paths: Sequence[Path], make_link: LinkMaker, names: dict[Path, str]) -> str:
    lines = []
    for p in paths:
        url = await make_link(p)
        size = p.stat().st_size / MiB
        name = names.get(p, p.name)
        if url:
            lines.append(f"\n:link: `{name}` ({size:.1f} MiB, too big to attach here): <{url}>")
        else:
            lines.append(f"\n`{name}` ({size:.1f} MiB) is too big to attach and no download link could be made; "
                         "ask an admin to fetch it from the server.")
    return "".join(lines)


class ResultFiles:
    """Which files of a job are delivered (resolved inside the data dir, never outside it), and the signed
    link that serves one. ``owner``: the bot (anything with ``repo``, ``files`` and ``file_server``; the
    file server starts after this is made, so it is read at each use)."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner


    def resolve_path(self, job_id: int, stored: Any) -> Path | None:
        """Engine paths may be absolute, relative to the job folder, or relative to the data dir."""
        if not stored:
            return None
        p = Path(str(stored))
        files = self.owner.files
        candidates = [p] if p.is_absolute() else [files.job_dir(job_id) / p, files.root / p]
        for c in candidates:
            try:
                c = c.resolve()
                if c.is_file() and c.is_relative_to(files.root.resolve()):
                    return c
            except (OSError, ValueError):
                continue
        return None

    async def result_files(self, job_id: int, outputs: dict[str, Any]
                           ) -> tuple[list[tuple[Path, str]], Path | None]:
        """((path, download name) list, the best LoRA or None): the final LoRA/checkpoint first, then the LoRA of
        the lowest validation loss (keep_best), grid, loss curve, images. ``outputs``: the engine's (the finished
        event's, after any ``file`` events the reporter saw), possibly empty after a restart: the artifact rows
        fill in."""
        arts = await self.owner.repo.list_artifacts(job_id)

        def resolved(raw: Any) -> list[Path]:
            return [p for r in (raw if isinstance(raw, list) else [raw])
                    if (p := self.resolve_path(job_id, r)) is not None]

        # Intermediate saves and the best-so-far LoRA share the final one's kind: never take them for it.
        best = resolved(outputs.get("best_lora", [])) + [
            p for a in arts if a.kind == "lora" and a.meta.get("role") == "best"
            and (p := self.resolve_path(job_id, a.path)) is not None]
        not_final = set(best) | set(resolved(outputs.get("intermediate", [])))
        out: list[tuple[Path, str]] = []
        for kind in ("lora", "checkpoint", "best", "grid", "plot", "image"):
            if kind == "best":
                paths = best[-1:]
            else:
                # the engine's outputs name the final file last; artifact rows (in the order written) when they
                # do not (the bot restarted after the job ended): the final save comes after every other
                named = [p for p in resolved(outputs.get(kind, [])) if p not in not_final]
                rows = [p for a in arts if a.kind == kind and a.meta.get("role") != "best"
                        and (p := self.resolve_path(job_id, a.path)) is not None and p not in not_final]
                if kind == "image":
                    paths = list(dict.fromkeys(named + rows))[:8]
                else:
                    paths = (named or rows)[-1:]  # intermediate saves stay on disk
            for p in paths:
                if p not in (q for q, _ in out):
                    out.append((p, p.name))
        return out, (best[-1] if best else None)

    async def difference_files(
        self, job_id: int, outputs: dict[str, Any]
    ) -> tuple[list[tuple[Path, str]], dict[Path, tuple[str, str]]]:
        """A copy-machine job's files: every pass-2 LoRA, the merged one, the saved copiers, then the
        pass-2 loss curves (the copier-check images were posted between the passes). Roles come from the
        engine's ``file`` events (artifact meta: role, pair), which survive a restart of the bot."""
        roles: dict[Path, tuple[str, str]] = {}
        for art in await self.owner.repo.list_artifacts(job_id, "lora"):
            p = self.resolve_path(job_id, art.path)
            meta = art.meta
            if p is not None and meta.get("role") in ("difference", "merged", "copier"):
                roles.setdefault(p, (str(meta["role"]), str(meta.get("pair") or "")))
        # The finished event's outputs, in case a file event was lost: lora = pass-2 LoRA(s).
        for key, role in (("lora", "difference"), ("merged", "merged"), ("copier", "copier")):
            for raw in outputs.get(key, []):
                p = self.resolve_path(job_id, raw)
                if p is not None and p not in roles:
                    roles[p] = (role, "")
        order = {"difference": 0, "merged": 1, "copier": 2}
        loras = sorted(roles, key=lambda p: order[roles[p][0]])  # stable: pairs keep the engine's order
        plots = list(dict.fromkeys(p for raw in outputs.get("plot", [])
                                   if (p := self.resolve_path(job_id, raw)) is not None))
        plots = [p for p in plots if "pass2" in p.parts] or plots
        files = loras + plots[: max(0, 10 - len(loras))]
        names: dict[Path, str] = {}
        for p in files:  # pass folders all name their curve alike: prefix the pair
            parts = p.parts
            name = p.name
            if "pass2" in parts and parts.index("pass2") > 0:
                name = f"{parts[parts.index('pass2') - 1]}-{p.name}"
            names[p] = name
        return [(p, names[p]) for p in files[:10]], roles

    async def link_for(self, job_id: int, path: Path) -> str | None:
        server = self.owner.file_server
        if server is None:
            return None
        repo, files = self.owner.repo, self.owner.files
        rel = files.relative(path)
        art = next((a for a in await repo.list_artifacts(job_id) if a.path == rel or
                    self.resolve_path(job_id, a.path) == path), None)
        if art is None:
            kind = "lora" if path.suffix == ".safetensors" else "image"
            art = await repo.add_artifact(job_id, kind, rel, bytes=path.stat().st_size)  # type: ignore[arg-type]
        return server.url_for(job_id, art.id)

    async def resolve_artifact(self, job_id: int, artifact_id: int) -> tuple[Path, str] | None:
        for art in await self.owner.repo.list_artifacts(job_id):
            if art.id == artifact_id:
                p = self.resolve_path(job_id, art.path)
                return (p, p.name) if p is not None else None
        return None
