"""The native calls release the GIL while they do I/O, so other Python
threads keep running during a long put or read."""

from __future__ import annotations

import threading
import time

from chalkcompute import Volume

PAYLOAD_BYTES = 256 << 20


def ticks_while(call) -> int:
    """Run ``call`` in a thread; return how often this thread ran meanwhile."""
    started = threading.Event()

    def worker() -> None:
        started.set()
        call()

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    ticks = 0
    while thread.is_alive():
        time.sleep(0.001)
        ticks += 1
    thread.join()
    return ticks


def test_put_and_read_release_gil() -> None:
    vol = Volume.create("threads")
    payload = b"\x5a" * PAYLOAD_BYTES
    # With the GIL held for the whole call this thread could not run at all
    # until the put returned; 1 ms sleeps give hundreds of ticks otherwise.
    assert ticks_while(lambda: vol.put_file("big.bin", payload)) > 20

    result: list[bytes] = []
    assert ticks_while(lambda: result.append(vol.read_file("big.bin"))) > 20
    assert result[0] == payload


def test_threads_write_one_volume() -> None:
    vol = Volume.create("threads")
    errors: list[BaseException] = []

    def write(index: int) -> None:
        try:
            vol.put_file(f"thread-{index}.txt", f"written by {index}")
        except BaseException as error:  # noqa: BLE001 - reported by the assert below
            errors.append(error)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(vol.versions()) == 5
    for index in range(4):
        assert vol.read_file(f"thread-{index}.txt") == f"written by {index}".encode()
