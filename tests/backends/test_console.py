"""The Console in pexpect's vocabulary: pattern lists, before/after, escapes, linear search."""

from __future__ import annotations

import re
import threading
import time

import pytest

import virtkit
from virtkit.backends.console import Console, _Searcher
from virtkit.backends.escapes import EscapeStripper, strip_escapes


def live_console() -> tuple[Console, list[bytes]]:
    """A console marked running whose input lands in the returned list."""
    sent: list[bytes] = []
    console = Console(sent.append)
    console.open()
    return console, sent


def feed_later(console: Console, *pieces: bytes, delay: float = 0.02) -> threading.Thread:
    """Feed ``pieces`` from another thread, one by one, as a guest would."""

    def run() -> None:
        for piece in pieces:
            time.sleep(delay)
            console.feed(piece)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


class TestExpect:
    """expect() with one pattern keeps its contract; with a list it returns an index."""

    def test_single_pattern_returns_match_and_sets_before_after(self) -> None:
        """The match comes back; before/after hold the text around it; the cursor moves on."""
        console, _ = live_console()
        console.feed(b"boot...\r\nlogin: ")
        match = console.expect("login:")
        assert isinstance(match, re.Match)
        assert console.before == b"boot...\r\n"
        assert console.after == b"login:"
        console.feed(b"again login: ")
        console.expect("login:")
        assert console.before == b" again "

    def test_list_returns_index_of_earliest_match(self) -> None:
        """The earliest match in the output wins; on a tie the first listed."""
        console, _ = live_console()
        console.feed(b"xx password: yy login: ")
        assert console.expect(["login:", "password:"]) == 1
        assert console.before == b"xx "
        assert console.expect([re.compile(rb"l\w+:"), "login:"]) == 0
        assert console.after == b"login:"

    def test_list_waits_for_output_from_another_thread(self) -> None:
        """A pattern cut across two feeds is found when its second half arrives."""
        console, _ = live_console()
        thread = feed_later(console, b"noise lo", b"gin", b": ")
        assert console.expect(["Password", "login: "], timeout=10) == 1
        thread.join()

    def test_text_regex_positions_are_bytes(self) -> None:
        """A str regex over UTF-8 output moves the cursor by bytes, not characters."""
        console, _ = live_console()
        console.feed("été ok; next".encode())
        match = console.expect(re.compile(r"ok"))
        assert match.group() == "ok"
        assert console.before == "été ".encode()
        console.expect("next")
        assert console.before == b"; "

    def test_bad_patterns_are_config_errors(self) -> None:
        """An empty list, an empty literal or a wrong type is refused by name."""
        console, _ = live_console()
        for bad in ([], "", b"", 42, [b"ok", 3]):
            with pytest.raises(virtkit.ConfigError, match="pattern"):
                console.expect(bad, timeout=0.1)  # type: ignore[call-overload]

    def test_timeout_and_stop_still_raise(self) -> None:
        """No match in time is a TimeoutError; a stopped guest a StateError."""
        console, _ = live_console()
        with pytest.raises(virtkit.TimeoutError, match="any of"):
            console.expect(["a1", "b2"], timeout=0.05)
        console.close("the guest powered off")
        with pytest.raises(virtkit.StateError, match="powered off"):
            console.expect("zz", timeout=5)

    def test_literal_search_is_linear(self) -> None:
        """Waiting through many small feeds does not rescan what was already searched."""
        console, _ = live_console()
        pieces = [b"x" * 64] * 4000 + [b"DONE"]
        scanned = 0
        real_find = bytearray.find

        class CountingBuffer(bytearray):
            def find(self, sub: bytes, start: int = 0, *rest: int) -> int:  # type: ignore[override]
                nonlocal scanned
                scanned += len(self) - start
                return real_find(self, sub, start, *rest)

        console._buf = CountingBuffer()
        thread = feed_later(console, *pieces, delay=0)
        console.expect(b"DONE", timeout=30)
        thread.join()
        total = sum(len(p) for p in pieces)
        # each byte is searched once, plus a pattern's length of overlap per wake-up
        assert scanned <= total + 4 * len(pieces)


class TestSendline:
    """sendline() types a line and a newline."""

    def test_sendline(self) -> None:
        """str and bytes lines both end in \\n."""
        console, sent = live_console()
        console.sendline("ls -l")
        console.sendline(b"")
        assert sent == [b"ls -l\n", b"\n"]
        with pytest.raises(virtkit.ConfigError, match="line"):
            console.sendline(3)  # type: ignore[arg-type]


class TestEscapes:
    """Terminal escape sequences can be stripped from what expect() searches."""

    def test_strip_escapes_function(self) -> None:
        """CSI, OSC (BEL and ST ended), charset selection: gone; text and UTF-8 kept."""
        raw = b"a\x1b[31mred\x1b[0m \x1b[6n\x1b]0;title\x07\x1b]2;t\x1b\\\x1b(Bok \xc3\x9b"
        assert strip_escapes(raw) == "ared ok Û".encode()

    def test_stripper_carries_state_and_maps_positions(self) -> None:
        """A sequence cut between feeds is still removed; clean offsets map back to raw ones."""
        raw = b"ab\x1b[31mcd\x1b]x\x1b\\ef"
        stripper = EscapeStripper()
        clean = b"".join(stripper.feed(raw[i : i + 3]) for i in range(0, len(raw), 3))
        assert clean == b"abcdef"
        assert [raw[stripper.to_raw(i)] for i in range(6)] == list(b"abcdef")
        assert stripper.to_clean(raw.index(b"c")) == 2

    def test_expect_through_colours(self) -> None:
        """A prompt split by colour codes matches only with strip_escapes."""
        console, _ = live_console()
        console.feed(b"\x1b[1;32mroot\x1b[0m@vk:~# ")
        with pytest.raises(virtkit.TimeoutError):
            console.expect("root@vk", timeout=0.05)
        console.expect("root@vk:~# ", strip_escapes=True)
        assert console.before == b""
        console.feed(b"tail")
        console.expect("tail")  # the raw cursor moved past the stripped match
        assert console.before == b""

    def test_default_from_attribute(self) -> None:
        """console.strip_escapes sets the default."""
        console, _ = live_console()
        console.strip_escapes = True
        console.feed(b"x\x1b[6ny")
        console.expect("xy", timeout=1)


class TestRunOnAFakeShell:
    """run() against a scripted shell: what a tty does to the output, and the search cost."""

    def test_exact_output_status_and_linear_search(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """The echo (wrapped, with a cursor query), CRLF line ends and colours are removed;
        the status is read; each output byte is searched a bounded number of times."""
        lines = [f"line {i} \x1b[1mbold\x1b[0m\r\n".encode() for i in range(3000)]
        console = Console()
        scanned = 0
        real_search = _Searcher.search

        def counting(self: _Searcher, buf: bytearray, pos: int) -> object:
            nonlocal scanned  # what this search looks at: literals resume, regexes do not
            begin = pos if self.literal is None else max(pos, self._scanned - len(self.literal) + 1)
            scanned += max(len(buf) - begin, 0)
            return real_search(self, buf, pos)

        monkeypatch.setattr(_Searcher, "search", counting)

        def feed(pieces: list[bytes]) -> None:
            for number, piece in enumerate(pieces):
                console.feed(piece)
                if number % 20 == 0:
                    time.sleep(0.001)  # let run() wake up many times

        def shell(typed: bytes) -> None:
            nonce = re.search(rb"VKB''([0-9a-f]+)", typed)
            assert nonce is not None
            echo = typed[:30] + b"\r" + typed[30:].replace(b"\n", b"\r\n")  # a wrapped echo
            pieces = [b"\x1b[6n" + echo, b"VKB" + nonce.group(1) + b"\r\n", *lines]
            pieces += [b"\r\nVKE" + nonce.group(1) + b" 3\r\n", b"vk# "]
            threading.Thread(target=feed, args=(pieces,)).start()

        console.set_writer(shell)
        console.open()
        out = console.run("make-output", prompt="vk# ", timeout=30)
        assert out == "".join(f"line {i} bold\n" for i in range(3000))
        assert console.exit_status == 3
        total = sum(len(p) for p in lines)
        assert scanned <= 2 * total + 64 * len(lines)
