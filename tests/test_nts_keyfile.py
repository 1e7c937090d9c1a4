"""The keys file's owner: load, rotate, reload and save on a timer
(``task.Clock``, a temporary directory), and what happens when a save fails."""

from __future__ import annotations

import fcntl
import io
import os
import shutil
import stat
import sys
import tempfile
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial import unittest

from udptime.nts.cookies import (
    COOKIE_NONCE_LENGTH,
    CookieKeys,
    MasterKey,
    decode_keys_file,
    encode_keys_file,
)
from udptime.nts.keyfile import KeyFileService

START = 1_700_000_000.0
ROTATE = 100.0  # ticks every second
KEYS = CookieKeys(15, bytes(range(32)), bytes(range(32, 64)))


class KeyFileServiceTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="udptime-nts-keyfile-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "keys.json")
        self.clock = Clock()
        self.clock.advance(START)
        self.events: list[dict[str, Any]] = []

    def service(self, start: bool = True) -> KeyFileService:
        svc = KeyFileService(self.path, self.clock, rotate=ROTATE)
        svc.log = Logger(observer=self.events.append)  # type: ignore[arg-type]
        if start:
            svc.startService()
            self.addCleanup(self.stop, svc)
        return svc

    def stop(self, svc: KeyFileService) -> None:
        if svc.running:
            svc.stopService()

    def on_disk(self) -> list[MasterKey]:
        with open(self.path, "rb") as f:
            return decode_keys_file(f.read())

    def ticks(self, count: int) -> None:
        self.clock.pump([1.0] * count)

    def until(self, when: float) -> None:
        self.ticks(int(when - self.clock.seconds()))

    def logged(self, level: LogLevel) -> list[dict[str, Any]]:
        return [e for e in self.events if e["log_level"] == level]

    def seal(self, svc: KeyFileService) -> bytes:
        return svc.holder.key_set.seal(KEYS, os.urandom(COOKIE_NONCE_LENGTH))

    def block_saves(self) -> str:
        """Make every save fail, for root too: a directory where the
        temporary file goes."""
        obstacle = f"{self.path}.tmp.{os.getpid()}"
        os.mkdir(obstacle)
        return obstacle

    # -- start-up ------------------------------------------------------------------

    def test_start_creates_private_file_with_next_key(self) -> None:
        svc = self.service()
        ks = svc.holder.key_set
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertTrue(os.path.exists(svc.lock_path))
        self.assertEqual(self.on_disk(), ks.keys)
        self.assertEqual(ks.current.created, START)
        assert ks.next is not None
        self.assertEqual(ks.next.created, START + ROTATE)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.assertEqual(svc.interval, 1.0)
        self.assertFalse(
            any(".tmp." in name for name in os.listdir(self.dir)), os.listdir(self.dir)
        )
        svc.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_short_periods_tick_faster(self) -> None:
        self.assertEqual(KeyFileService(self.path, self.clock, rotate=2).interval, 0.5)

    def test_restart_opens_cookies(self) -> None:
        first = self.service()
        cookie = self.seal(first)
        first.stopService()
        second = self.service()
        self.assertEqual(second.holder.key_set, first.holder.key_set)
        self.assertEqual(second.holder.key_set.open(cookie), KEYS)

    def test_file_of_earlier_versions(self) -> None:
        """One key, no next key, mode 0644: loaded, a next key added, 0600."""
        old = MasterKey(7, os.urandom(64), START - 10)
        with open(self.path, "wb") as f:
            f.write(encode_keys_file([old]))
        os.chmod(self.path, 0o644)
        cookie = old.seal(KEYS, bytes(16))
        svc = self.service()
        ks = svc.holder.key_set
        self.assertEqual(ks.current, old)
        self.assertEqual(ks.open(cookie), KEYS)
        assert ks.next is not None
        self.assertEqual(ks.next.created, START - 10 + ROTATE)
        self.assertEqual(self.on_disk(), [old, ks.next])
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def assertRefused(self, svc: KeyFileService, why: str) -> None:
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            svc.startService()
        self.assertEqual(raised.exception.code, 1)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(
            lines[0].startswith(f"udptime: NTS keys file {self.path}: "), lines[0]
        )
        self.assertIn(why, lines[0])
        self.assertFalse(svc.running)
        self.assertFalse(hasattr(svc.holder, "key_set"))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unwritable_at_start(self) -> None:
        obstacle = self.block_saves()
        self.assertRefused(self.service(start=False), obstacle)
        self.assertFalse(os.path.exists(self.path))

    def test_unwritable_existing_file_at_start(self) -> None:
        # No rotation due: only the save that proves it can write finds out.
        keys = [
            MasterKey(7, os.urandom(64), START - 1),
            MasterKey(8, os.urandom(64), START + ROTATE - 1),
        ]
        with open(self.path, "wb") as f:
            f.write(encode_keys_file(keys))
        self.block_saves()
        self.assertRefused(self.service(start=False), "Is a directory")
        self.assertEqual(self.on_disk(), keys)

    def test_corrupt_file_at_start(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"garbage")
        self.assertRefused(self.service(start=False), "not JSON")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"garbage")

    def test_missing_directory_at_start(self) -> None:
        self.path = os.path.join(self.dir, "no", "keys.json")
        self.assertRefused(self.service(start=False), "cannot open lock file")

    # -- the timer -----------------------------------------------------------------

    def test_rotation(self) -> None:
        svc = self.service()
        before = svc.holder.key_set
        self.ticks(3)
        self.assertIs(svc.holder.key_set, before)  # nothing to do, nothing swapped
        cookie = self.seal(svc)
        self.until(START + ROTATE)
        ks = svc.holder.key_set
        self.assertEqual(ks.current, before.next)
        assert ks.next is not None
        self.assertEqual(ks.next.created, START + 2 * ROTATE)
        self.assertEqual(ks.previous, (before.current,))
        self.assertEqual(ks.open(cookie), KEYS)
        self.assertEqual(self.on_disk(), ks.keys)
        self.assertEqual(svc.rotations, 1)
        self.assertEqual(svc.save_failures, 0)
        (info,) = [e for e in self.logged(LogLevel.info) if "new cookie" in str(e)]
        self.assertIn(f"{ks.next.key_id:08x}", formatEvent(info))

    def test_shared_file(self) -> None:
        a = self.service()
        b = self.service()
        self.assertEqual(a.holder.key_set, b.holder.key_set)
        old = self.seal(a)
        self.until(START + ROTATE)
        self.assertEqual(a.rotations + b.rotations, 1)  # one rotated, one reloaded
        self.assertGreaterEqual((b if a.rotations else a).reloads, 1)
        self.assertEqual(a.holder.key_set, b.holder.key_set)
        self.assertEqual(b.holder.key_set.open(self.seal(a)), KEYS)
        self.assertEqual(a.holder.key_set.open(self.seal(b)), KEYS)
        self.assertEqual(b.holder.key_set.open(old), KEYS)

    def test_reloads_a_file_changed_by_another_process(self) -> None:
        svc = self.service()
        stranger = MasterKey(0xFEED, os.urandom(64), START - 1)
        tmp = self.path + ".other"
        with open(tmp, "wb") as f:
            f.write(encode_keys_file([stranger, *self.on_disk()]))
        os.replace(tmp, self.path)
        self.ticks(1)
        self.assertEqual(svc.reloads, 1)
        self.assertIn(stranger, svc.holder.key_set.keys)
        self.assertEqual(svc.holder.key_set.open(stranger.seal(KEYS, bytes(16))), KEYS)

    def test_deleted_file_written_again(self) -> None:
        svc = self.service()
        keys = self.on_disk()
        os.unlink(self.path)
        self.ticks(1)
        self.assertEqual(self.on_disk(), keys)
        self.assertEqual(svc.holder.key_set.keys, keys)

    def test_save_failure_keeps_saved_key_logs_counts_retries(self) -> None:
        svc = self.service()
        first = svc.holder.key_set
        assert first.next is not None
        obstacle = self.block_saves()
        self.until(START + ROTATE)
        # The next key was saved: promoting it is fine; its successor is not.
        self.assertEqual(svc.holder.key_set.current, first.next)
        self.assertEqual(svc.save_failures, 1)
        cookies = []
        for _ in range(299):  # three periods: the key seals past its own
            self.ticks(1)
            ks = svc.holder.key_set
            self.assertEqual(ks.current, first.next)
            self.assertIsNone(ks.next)
            self.assertIn(ks.current, self.on_disk())
            cookies.append(self.seal(svc))
        self.assertEqual(svc.save_failures, 300)
        self.assertEqual(self.on_disk(), first.keys)
        errors = self.logged(LogLevel.error)
        self.assertEqual(len(errors), 5)  # at most one a minute
        self.assertEqual([e["suppressed"] for e in errors], [0, 59, 59, 59, 59])
        text = formatEvent(errors[0])
        self.assertIn(self.path, text)
        self.assertIn("Is a directory", text)
        self.assertIn(f"{first.next.key_id:08x}", text)

        os.rmdir(obstacle)
        self.ticks(1)
        ks = svc.holder.key_set
        self.assertEqual(ks.current, first.next)
        assert ks.next is not None
        now = self.clock.seconds()
        self.assertEqual(ks.next.created, now + ROTATE / 2)
        self.assertEqual(self.on_disk(), ks.keys)
        self.assertEqual(svc.save_failures, 300)
        self.assertTrue(
            any("saved again after 300" in formatEvent(e) for e in self.events)
        )
        svc.stopService()
        restarted = self.service()
        for cookie in cookies:
            self.assertEqual(restarted.holder.key_set.open(cookie), KEYS)

    def test_corrupt_file_at_runtime(self) -> None:
        svc = self.service()
        cookie = self.seal(svc)
        tmp = self.path + ".other"
        with open(tmp, "wb") as f:
            f.write(b"garbage")
        os.replace(tmp, self.path)
        self.ticks(5)
        self.assertEqual(len(self.logged(LogLevel.warn)), 1)
        self.assertEqual(svc.holder.key_set.open(cookie), KEYS)
        # Rotation reads the file under the lock: it is not overwritten.
        self.until(START + ROTATE + 1)
        self.assertEqual(svc.save_failures, 2)
        self.assertIsNone(svc.holder.key_set.next)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"garbage")

    def test_lock_held_elsewhere(self) -> None:
        svc = self.service()
        fd = os.open(svc.lock_path, os.O_RDWR)
        self.addCleanup(os.close, fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        self.until(START + ROTATE)
        self.assertEqual(svc.save_failures, 0)  # a peer saving: no alarm yet
        self.ticks(1)
        self.assertEqual(svc.save_failures, 1)  # still held: that is a failure
        self.assertIn("held", formatEvent(self.logged(LogLevel.error)[0]))
        fcntl.flock(fd, fcntl.LOCK_UN)
        self.ticks(1)
        self.assertIsNotNone(svc.holder.key_set.next)
        self.assertEqual(svc.rotations, 1)

    def test_a_bug_does_not_stop_the_timer(self) -> None:
        svc = self.service()
        calls = []

        def broken() -> None:
            calls.append(1)
            raise RuntimeError("bug")

        svc.tick = broken  # type: ignore[method-assign]
        self.ticks(2)
        self.assertEqual(len(calls), 2)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 0)
        self.assertEqual(len(self.logged(LogLevel.critical)), 2)
