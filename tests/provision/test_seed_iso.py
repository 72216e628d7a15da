"""The cloud-init NoCloud seed ISO: label, names in every namespace, generated meta-data."""

from __future__ import annotations

import io
import stat
from pathlib import Path

import pycdlib
import pytest

import virtkit
from virtkit.model import CloudInit, Machine
from virtkit.provision import build_seed_iso, default_meta_data, seed_files, write_seed_iso

UUID = "0b8e5c2e-8f5e-4d7e-9a55-1b2c3d4e5f60"


def _open(data: bytes) -> pycdlib.PyCdlib:
    iso = pycdlib.PyCdlib()
    iso.open_fp(io.BytesIO(data))
    return iso


def _read(iso: pycdlib.PyCdlib, **path: str) -> bytes:
    out = io.BytesIO()
    iso.get_file_from_iso_fp(out, **path)
    return out.getvalue()


class TestSeedIso:
    def test_label_and_files_in_rock_ridge_joliet_and_iso9660(self) -> None:
        """Volume label 'cidata'; user-data/meta-data readable by Rock Ridge, Joliet and 8.3 names."""
        machine = Machine(
            name="web-1", uuid=UUID, cloud_init=CloudInit(user_data="#cloud-config\nx: 1\n")
        )
        iso = _open(build_seed_iso(seed_files(machine)))
        try:
            assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
            assert _read(iso, rr_path="/user-data") == b"#cloud-config\nx: 1\n"
            assert _read(iso, joliet_path="/user-data") == b"#cloud-config\nx: 1\n"
            assert _read(iso, iso_path="/USERDATA.;1") == b"#cloud-config\nx: 1\n"
            meta = _read(iso, rr_path="/meta-data").decode()
            names = sorted(
                c.rock_ridge.name()
                for c in iso.list_children(rr_path="/")
                if c.rock_ridge and c.is_file()
            )
            assert names == [b"meta-data", b"user-data"]
        finally:
            iso.close()
        assert meta == f"instance-id: {UUID}\nlocal-hostname: web-1\n" == default_meta_data(machine)

    def test_explicit_meta_data_and_network_config_are_used(self) -> None:
        """Given meta_data is kept verbatim; network-config is added when set."""
        ci = CloudInit(
            user_data="u", meta_data="instance-id: fixed\n", network_config="version: 2\n"
        )
        iso = _open(build_seed_iso(seed_files(Machine(name="n", cloud_init=ci))))
        try:
            assert _read(iso, rr_path="/meta-data") == b"instance-id: fixed\n"
            assert _read(iso, rr_path="/network-config") == b"version: 2\n"
            assert _read(iso, joliet_path="/network-config") == b"version: 2\n"
        finally:
            iso.close()

    def test_write_seed_iso_is_atomic_private_and_complete(self, tmp_path: Path) -> None:
        """write_seed_iso writes the whole ISO (mode 0600) and leaves no temporary file."""
        machine = Machine(name="w", cloud_init=CloudInit(user_data="hello"))
        path = write_seed_iso(machine, tmp_path / "seed.iso")
        assert path.stat().st_size % 2048 == 0
        assert stat.S_IMODE(path.stat().st_mode) == 0o600  # user-data may hold secrets
        assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]
        iso = _open(path.read_bytes())
        try:
            assert _read(iso, rr_path="/user-data") == b"hello"
        finally:
            iso.close()

    def test_machine_without_cloud_init_is_a_config_error(self) -> None:
        """seed_files() on a machine without cloud_init names the field."""
        with pytest.raises(virtkit.ConfigError, match="cloud_init"):
            seed_files(Machine(name="plain"))

    def test_unknown_seed_file_name_is_refused(self) -> None:
        """Only the NoCloud names can go on the seed."""
        with pytest.raises(virtkit.ConfigError, match="vendor-data"):
            build_seed_iso({"vendor-data": b"x"})
