"""Signed download links (issue 17): a link names one artifact of one job and nothing else; editing the path
never reaches another job's file or anything outside the data folder; expired links are refused; /job delete
revokes a job's links for good (ids are never reused)."""

from __future__ import annotations

import aiohttp
from cogkit import answer, run_command


async def test_a_link_opens_its_own_file_only_and_job_delete_revokes_it(fake_discord, bot):
    fake = fake_discord
    bob = int(fake.users["bob"]["id"])
    sched = bot.scheduler
    a = await sched.submit(bob, "train", {"kind": "train", "output_name": "big-a", "steps": 3})
    b = await sched.submit(bob, "train", {"kind": "train", "output_name": "big-b", "steps": 3})
    for j in (a, b):
        assert (await sched.wait_for_job(j.id, 30)).state == "succeeded"
        await bot.progress.wait_idle(j.id, 30)
    [art_a] = await bot.repo.list_artifacts(a.id, "lora")
    [art_b] = await bot.repo.list_artifacts(b.id, "lora")
    fs = bot.file_server
    url_a, url_b = fs.url_for(a.id, art_a.id), fs.url_for(b.id, art_b.id)
    bytes_a = bot.files.resolve(art_a.path).read_bytes()
    base = fs.base_url + "/files/"
    token = url_a.removeprefix(base)
    job_part, art_part, exp, mac = token.split(".")
    async with aiohttp.ClientSession() as http:

        async def get(url: str) -> tuple[int, bytes]:
            async with http.get(url, allow_redirects=False) as r:
                return r.status, await r.read()

        assert await get(url_a) == (200, bytes_a)
        # edit the path: another job, another artifact, both, a longer expiry -> the MAC no longer matches
        for forged in (f"{b.id}.{art_part}.{exp}.{mac}", f"{job_part}.{art_b.id}.{exp}.{mac}",
                       f"{b.id}.{art_b.id}.{exp}.{mac}", f"{job_part}.{art_part}.{int(exp) + 10**6}.{mac}"):
            status, body = await get(base + forged)
            assert status == 403 and body != bytes_a, forged
        # even a validly signed pair is checked: job A's link cannot name job B's artifact
        assert (await get(fs.url_for(a.id, art_b.id)))[0] == 404
        # nothing outside the data folder through the path
        for evil in ("..%2f..%2f..%2fetc%2fpasswd", "../../etc/passwd", "%2e%2e/%2e%2e/loraforge.db"):
            status, body = await get(base + evil)
            assert status in (403, 404) and b"root:" not in body and b"SQLite" not in body, evil
        assert (await get(fs.url_for(a.id, art_a.id, ttl_s=-1)))[0] == 410  # expired
        # /job delete revokes: the same link now finds nothing, and B's link still works
        rec = await run_command(fake, bot, "job", {"id": a.id, "confirm": True}, user="bob", subcommand="delete")
        assert f"Deleted job #{a.id}" in answer(rec)
        assert (await get(url_a))[0] == 404
        assert (await get(url_b))[0] == 200
        c = await sched.submit(bob, "train", {"kind": "train", "output_name": "big-c", "steps": 3})
        assert (await sched.wait_for_job(c.id, 30)).state == "succeeded"
        assert c.id != a.id and all(x.id != art_a.id for x in await bot.repo.list_artifacts(c.id))
        assert (await get(url_a))[0] == 404  # a new job never inherits a deleted job's links
