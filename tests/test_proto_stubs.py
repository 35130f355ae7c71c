"""The checked-in stubs match proto/ byte for byte, and the contract keeps its shape."""

from __future__ import annotations

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from allocator_client import codegen
from allocator_client.v1 import allocator_pb2 as pb
from google.protobuf import descriptor_pb2

ALL_FILES = (*codegen.GENERATED_FILES, codegen.INIT_FILE)

# name -> (client streaming, server streaming)
RPCS = {
    "CreateExperiment": (False, False),
    "GetExperiment": (False, False),
    "ListExperiments": (False, False),
    "ArchiveExperiment": (False, False),
    "AddVariant": (False, False),
    "Assign": (False, False),
    "AssignBatch": (False, False),
    "AssignStream": (True, True),
    "Reward": (False, False),
    "RewardBatch": (False, False),
    "RewardStream": (True, True),
    "GetReport": (False, False),
    "Promote": (False, False),
    "Rollback": (False, False),
    "Pause": (False, False),
    "Resume": (False, False),
    "WatchEvents": (False, True),
}


def test_checked_in_stubs_equal_a_fresh_codegen(tmp_path: Path) -> None:
    assert codegen.main(["--out", str(tmp_path)]) == 0
    checked_in = codegen.default_out_dir()
    for name in ALL_FILES:
        assert (tmp_path / name).read_bytes() == (checked_in / name).read_bytes(), (
            f"{name} is stale: run `make proto`"
        )
    assert codegen.main(["--check"]) == 0


def test_check_mode_flags_a_stale_or_missing_file(tmp_path: Path) -> None:
    assert codegen.main(["--out", str(tmp_path)]) == 0
    (tmp_path / "allocator_pb2.py").write_text("# edited by hand\n")
    (tmp_path / codegen.INIT_FILE).unlink()
    assert codegen.main(["--out", str(tmp_path), "--check"]) == 1
    assert codegen.main(["--out", str(tmp_path)]) == 0
    assert codegen.main(["--out", str(tmp_path), "--check"]) == 0


def test_write_reports_only_changed_files(tmp_path: Path) -> None:
    files = {"a.py": b"one\n", "b.py": b"two\n"}
    assert codegen.write(files, tmp_path) == [tmp_path / "a.py", tmp_path / "b.py"]
    assert codegen.write({**files, "b.py": b"three\n"}, tmp_path) == [tmp_path / "b.py"]
    assert codegen.stale(files, tmp_path) == ["b.py"]


def test_grpc_stub_imports_messages_relatively() -> None:
    source = (codegen.default_out_dir() / "allocator_pb2_grpc.py").read_text()
    assert "from . import allocator_pb2 as " in source
    assert "from allocator.v1" not in source


def test_relativize_and_rename_reject_unexpected_input() -> None:
    with pytest.raises(codegen.CodegenError, match="found 0"):
        codegen.relativize_imports("import grpc\n")
    twice = "from allocator.v1 import allocator_pb2 as x\n" * 2
    with pytest.raises(codegen.CodegenError, match="found 2"):
        codegen.relativize_imports(twice)
    with pytest.raises(codegen.CodegenError, match="found 0"):
        codegen.rename_module("_builder.Build(DESCRIPTOR, 'other', _globals)\n")


def test_missing_proto_root_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(codegen.CodegenError, match="not found"):
        codegen.generate(tmp_path)
    assert codegen.main(["--proto-root", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_protoc_failure_carries_its_stderr(tmp_path: Path) -> None:
    broken = tmp_path / codegen.PROTO_FILE
    broken.parent.mkdir(parents=True)
    broken.write_text('syntax = "proto3";\nmessage {\n')
    with pytest.raises(codegen.CodegenError) as caught:
        codegen.generate(tmp_path)
    assert caught.value.returncode != 0
    assert "allocator.proto" in caught.value.stderr


def test_service_has_every_rpc_with_its_streaming_shape() -> None:
    service = pb.DESCRIPTOR.services_by_name["Allocator"]
    shapes = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert shapes == RPCS
    for method in service.methods:
        # One request/response message per RPC (buf's RPC_REQUEST/RESPONSE_STANDARD_NAME).
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


def test_package_and_enum_zero_values() -> None:
    assert pb.DESCRIPTOR.package == "allocator.v1"
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        zero = enum.values_by_number[0].name
        assert zero.endswith("_UNSPECIFIED"), enum.name
        prefix = zero.removesuffix("UNSPECIFIED")
        assert all(value.name.startswith(prefix) for value in enum.values), enum.name


def test_batch_messages_are_columnar_and_packed() -> None:
    response = pb.AssignBatchResponse.DESCRIPTOR.fields_by_name
    request = pb.RewardBatchRequest.DESCRIPTOR.fields_by_name
    for fields, numeric, strings in (
        (response, ("variant_indices", "propensities"), ("variants",)),
        (request, ("indices", "variant_indices", "values", "prediction_scores"), ("event_ids",)),
    ):
        assert all(fields[name].is_repeated and fields[name].is_packed for name in numeric)
        assert all(fields[name].is_repeated for name in strings)
    assert not response["batch_token"].is_repeated
    assert pb.RewardBatchResponse.DESCRIPTOR.fields_by_name["statuses"].is_packed


def _descriptor_with_comments(tmp_path: Path) -> descriptor_pb2.FileDescriptorProto:
    out = tmp_path / "allocator.pb"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{codegen.default_proto_root()}",
            f"-I{resources.files('grpc_tools') / '_proto'}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            codegen.PROTO_FILE,
        ],
        check=True,
        capture_output=True,
    )
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return files.file[0]


def _documented_paths(proto: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    """Source path -> element name, for every element that must carry a comment."""
    # Path numbers are FileDescriptorProto/DescriptorProto field numbers (descriptor.proto):
    # message_type 4, enum_type 5, service 6; field 2, nested_type 3, oneof_decl 8; value 2.
    paths: dict[tuple[int, ...], str] = {}

    def message(msg: descriptor_pb2.DescriptorProto, path: tuple[int, ...]) -> None:
        if msg.options.map_entry:
            return
        paths[path] = msg.name
        for i, field in enumerate(msg.field):
            paths[(*path, 2, i)] = f"{msg.name}.{field.name}"
        for i, oneof in enumerate(msg.oneof_decl):
            if not oneof.name.startswith("_"):  # synthetic oneofs of proto3 `optional`
                paths[(*path, 8, i)] = f"{msg.name}.{oneof.name}"
        for i, nested in enumerate(msg.nested_type):
            message(nested, (*path, 3, i))

    for i, msg in enumerate(proto.message_type):
        message(msg, (4, i))
    for i, enum in enumerate(proto.enum_type):
        paths[(5, i)] = enum.name
        for j, value in enumerate(enum.value):
            paths[(5, i, 2, j)] = value.name
    for i, service in enumerate(proto.service):
        paths[(6, i)] = service.name
        for j, method in enumerate(service.method):
            paths[(6, i, 2, j)] = method.name
    return paths


def test_every_element_of_the_proto_has_a_comment(tmp_path: Path) -> None:
    proto = _descriptor_with_comments(tmp_path)
    comments = {
        tuple(loc.path): loc.leading_comments.strip() for loc in proto.source_code_info.location
    }
    paths = _documented_paths(proto)
    assert len(paths) > 200  # sanity: the walk found the whole file
    undocumented = sorted(name for path, name in paths.items() if not comments.get(path))
    assert undocumented == []
