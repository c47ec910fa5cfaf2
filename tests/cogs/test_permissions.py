"""Who may do what: the trainer role, owners vs others, admins, shared datasets, quotas."""

from __future__ import annotations

from cogkit import add_images, answer, run_command


async def test_user_without_trainer_role_cannot_train_or_upload(fake_discord, bot):
    fake = fake_discord
    rec = await run_command(fake, bot, "dataset", {"name": "c", **add_images(fake, 1)}, user="carol",
                            subcommand="create")
    assert "trainer role" in answer(rec)
    await run_command(fake, bot, "dataset", {"name": "shared", **add_images(fake, 1), "shared": True},
                      user="bob", subcommand="create")
    rec = await run_command(fake, bot, "train", {"dataset": "shared", "steps": 2}, user="carol")
    assert "trainer role" in answer(rec)
    assert await bot.repo.list_jobs() == []


async def test_others_jobs_are_invisible_and_untouchable(fake_discord, bot, monkeypatch):
    fake = fake_discord
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    await run_command(fake, bot, "dataset", {"name": "b", **add_images(fake, 1)}, user="bob", subcommand="create")
    await run_command(fake, bot, "train", {"dataset": "b", "steps": 3000, "output_name": "slow-p"}, user="bob")
    # carol (no role) and a second trainer both get the same "no such job" answer
    dave = fake.add_user("dave", roles=[fake.role_ids["trainer"]])
    for who in ("carol", dave):
        for cmd, sub, extra in (("cancel", None, {}), ("retrain", None, {}), ("resume", None, {}), ("job", "show", {}),
                                ("job", "delete", {"confirm": True})):
            rec = await run_command(fake, bot, cmd, {"id": 1, **extra}, user=who, subcommand=sub)
            text = answer(rec)
            assert "No job of yours" in text or "trainer role" in text, (cmd, text)
        rec = await run_command(fake, bot, "jobs", None, user=who)
        assert "#1" not in answer(rec)
    rec = await run_command(fake, bot, "jobs", {"all": True}, user=dave)
    assert "#1" not in answer(rec) and "Only admins" in answer(rec)
    # job-id autocomplete: others never see bob's job; an admin finds it by typing its name
    for who, expected in ((dave, []), ("alice", ["#1"])):
        payload = fake.autocomplete("cancel", {"id": "slow"}, focused="id", user=who)
        ac = fake.feed(bot, payload)
        await fake.wait_for_response(payload)
        assert [c["name"].split()[0] for c in ac.autocomplete_choices] == expected, who
    assert not (await bot.repo.get_job(1)).cancel_requested
    # an admin sees everything and may cancel
    rec = await run_command(fake, bot, "jobs", {"all": True}, user="alice")
    assert "**#1**" in answer(rec)
    rec = await run_command(fake, bot, "job", {"id": 1}, user="alice", subcommand="show")
    assert "Job #1" in answer(rec)
    rec = await run_command(fake, bot, "cancel", {"id": 1}, user="alice")
    assert "ancel" in answer(rec)
    assert (await bot.scheduler.wait_for_job(1, 20)).state == "cancelled"
    # finished now: still nobody else's to delete; the admin may
    rec = await run_command(fake, bot, "job", {"id": 1, "confirm": True}, user=dave, subcommand="delete")
    assert "No job of yours" in answer(rec) and await bot.repo.get_job(1) is not None
    rec = await run_command(fake, bot, "job", {"id": 1, "confirm": True}, user="alice", subcommand="delete")
    assert "Deleted job #1" in answer(rec) and await bot.repo.get_job(1) is None


async def test_private_datasets_stay_private(fake_discord, bot):
    fake = fake_discord
    await run_command(fake, bot, "dataset", {"name": "mine", **add_images(fake, 2)}, user="bob", subcommand="create")
    ds = (await bot.repo.list_datasets())[0]
    dave = fake.add_user("dave", roles=[fake.role_ids["trainer"]])
    for ref in ("mine", f"#{ds.id}"):
        for sub, extra in (("show", {}), ("delete", {"confirm": True}), ("caption", {"number": 1, "caption": "x"})):
            rec = await run_command(fake, bot, "dataset", {"dataset": ref, **extra}, user=dave, subcommand=sub)
            assert "No dataset of yours" in answer(rec), (sub, answer(rec))
        rec = await run_command(fake, bot, "train", {"dataset": ref}, user=dave)
        assert "No dataset of yours" in answer(rec)
    rec = await run_command(fake, bot, "dataset", None, user=dave, subcommand="list")
    assert "mine" not in answer(rec)
    assert await bot.repo.get_dataset(ds.id) is not None
    # shared: others may look and train, not change or delete
    await bot.repo.update_dataset(ds.id, visibility="shared")
    rec = await run_command(fake, bot, "dataset", {"dataset": f"#{ds.id}"}, user=dave, subcommand="show")
    assert rec.followups[-1].file_names
    rec = await run_command(fake, bot, "dataset", {"dataset": f"#{ds.id}", "confirm": True}, user=dave,
                            subcommand="delete")
    assert "only its owner" in answer(rec)
    rec = await run_command(fake, bot, "train", {"dataset": f"#{ds.id}", "steps": 2, "output_name": "fast-s"},
                            user=dave)
    assert "Queued job" in answer(rec)
    job = (await bot.repo.list_jobs())[0]
    assert job.owner_id == int(dave["id"])
    # the admin may delete anyone's dataset (once no job needs it any more)
    await bot.scheduler.wait_for_job(job.id, 20)
    await bot.progress.wait_idle(job.id, 20)
    rec = await run_command(fake, bot, "dataset", {"dataset": f"#{ds.id}", "confirm": True}, user="alice",
                            subcommand="delete")
    assert "Deleted" in answer(rec)


async def test_quota_is_explained(fake_discord, bot_factory, monkeypatch):
    fake = fake_discord
    monkeypatch.setenv("STUB_STEP_S", "0.05")
    b = bot_factory(limits={"max_queued_per_user": 1, "max_steps": 100})
    async with fake.running(b, gateway=False):
        await run_command(fake, b, "dataset", {"name": "q", **add_images(fake, 1)}, user="bob", subcommand="create")
        rec = await run_command(fake, b, "train", {"dataset": "q", "steps": 500}, user="bob")
        assert "500 steps" in answer(rec) and "limit of 100" in answer(rec)
        for i in range(2):
            rec = await run_command(fake, b, "train", {"dataset": "q", "steps": 100, "output_name": f"slow-{i}"},
                                    user="bob")
            assert "Queued job" in answer(rec)
            if i == 0:  # the first one leaves the queue when it starts
                await fake.wait_for(lambda: 1 in b.scheduler.running_jobs(), 10)
        rec = await run_command(fake, b, "train", {"dataset": "q", "steps": 100, "output_name": "slow-3"}, user="bob")
        assert "waiting in the queue" in answer(rec) and "limit is 1" in answer(rec)
        assert rec.followups[-1].ephemeral


async def test_job_thread_is_private_with_the_owner_added(fake_discord, bot):
    fake = fake_discord
    await run_command(fake, bot, "dataset", {"name": "t", **add_images(fake, 1)}, user="bob", subcommand="create")
    await run_command(fake, bot, "train", {"dataset": "t", "steps": 2, "output_name": "fast-t"}, user="bob")
    thread = next(iter(fake.threads.values()))
    assert thread["type"] == 12  # private: other members cannot open it or its files
    bob = fake.users["bob"]["id"]
    assert fake.calls("PUT", f"/channels/{thread['id']}/thread-members/{bob}")
    await bot.scheduler.wait_for_job(1, 20)
    await bot.progress.wait_idle(1, 20)


async def test_train_refuses_a_base_model_path_that_is_not_listed(fake_discord, bot):
    fake = fake_discord
    await run_command(fake, bot, "dataset", {"name": "p", **add_images(fake, 1)}, user="bob", subcommand="create")
    rec = await run_command(fake, bot, "train", {"dataset": "p", "base_model": "/etc/hostname"}, user="bob")
    assert "`base_model`" in answer(rec) and "not a base model of this server" in answer(rec), answer(rec)
    job_file = fake.add_attachment("job.toml", b'base_model = "/root/.ssh/id_rsa"\nsteps = 2\n')
    rec = await run_command(fake, bot, "train", {"dataset": "p", "job_file": job_file}, user="bob")
    assert "not a base model of this server" in answer(rec), answer(rec)
    assert rec.followups[-1].ephemeral
    assert await bot.repo.list_jobs() == []


async def test_admin_sync_publishes_to_the_configured_guilds(fake_discord, bot_factory):
    fake = fake_discord
    other = int(fake.add_guild("second server")["id"])
    bot = bot_factory(discord={"guild_ids": [fake.guild_id, other]})
    async with fake.running(bot, gateway=False):
        rec = await run_command(fake, bot, "admin", {}, user="alice", subcommand="sync")
        assert "Synced" in answer(rec) and "2 configured server(s)" in answer(rec)
        for gid in (fake.guild_id, other):
            assert "train" in {c["name"] for c in fake.commands[gid]}
        assert None not in fake.commands  # no global commands when guilds are configured
        rec = await run_command(fake, bot, "admin", {"scope": "global"}, user="alice", subcommand="sync")
        assert "every server" in answer(rec) and "train" in {c["name"] for c in fake.commands[None]}


async def test_admin_sync_without_configured_guilds_is_global(fake_discord, bot):
    fake = fake_discord
    rec = await run_command(fake, bot, "admin", {}, user="alice", subcommand="sync")
    assert "every server" in answer(rec)
    assert "train" in {c["name"] for c in fake.commands[None]} and fake.guild_id not in fake.commands
    rec = await run_command(fake, bot, "admin", {}, user="bob", subcommand="sync")
    assert "Only admins" in answer(rec)
