"""Tiny models built from configs (never downloaded) and a tiny synthetic world to edit them with."""

import json
import os

# idle OpenMP threads sleep instead of spinning: with another torch job on the same 2 cores,
# spinning threads made the tests ~30x slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tempfile

# everything a command writes without a given path goes to a scratch home, never the user's
os.environ["MEND_HOME"] = tempfile.mkdtemp(prefix="mend-test-home-")

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from mend.base_model import BaseModelConfig, build_base_model, train_tokenizer
from mend.data.world import World, WorldConfig, generate_world
from mend.models import load_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def world_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("world") / "world.json"
    path.write_text(json.dumps(generate_world(WorldConfig(n_entities=60, n_val_entities=10, n_test_entities=10, n_locality_entities=10))))
    return path


@pytest.fixture(scope="session")
def world(world_path):
    return World.load(world_path)


@pytest.fixture(scope="session")
def tokenizer(world):
    return train_tokenizer([f"{f.prompt} {f.answer}" for f in world.training_facts()], vocab_size=400)


def _save(model, tokenizer, path):
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                     bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save(GPT2LMHeadModel(cfg), tokenizer, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=64,
                      bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    return _save(LlamaForCausalLM(cfg), tokenizer, tmp_path_factory.mktemp("llama"))


def _step(x):
    """One float32 rounding step at each entry of x."""
    return torch.nextafter(x.abs(), torch.tensor(float("inf"))) - x.abs()


def _same_up_to_rounding(a, b):
    """Equal to within one float32 rounding step of each tensor. The same active set reached in another
    order gives the same float64 memory (P, the rows' shares) to ~1e-12 relative
    (tests/test_aggregation.py); its float32 copy can then only differ where that last rounding fell
    differently. A layer holds P Uᵀ as H and corrections A, Bᵀ Uᵀ (P Uᵀ = H − A Bᵀ Uᵀ, `LayerMemory`),
    split where that history folded them: P Uᵀ itself is compared, to within the rounding of H to
    float32 (half a step on each side) and of A and Bᵀ Uᵀ (2⁻²³ |A| |Bᵀ Uᵀ| on each side)."""
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith(".mend_pa") or k.endswith(".mend_pbu"):
            continue
        if k.endswith(".mend_h"):
            layer = k[: -len("h")]
            (pa, ha, ea), (pb, hb, eb) = ((s[k].double() - s[layer + "pa"].double() @ s[layer + "pbu"].double(), s[k],
                                           s[layer + "pa"].double().abs() @ s[layer + "pbu"].double().abs()) for s in (a, b))
            bound = (_step(ha) + _step(hb)).double() / 2 + 2.0**-23 * (ea + eb)
            assert pa.shape == pb.shape and bool(((pa - pb).abs() <= bound).all()), k
            continue
        assert bool(((a[k] - b[k]).abs() <= _step(b[k])).all()), k


def weights(service):
    """The served model's edited state: its weights and edit memories."""
    from mend.model_state import edited_state

    return edited_state(service.model)


def assert_same(a, b):
    """Equal bit for bit, tensor by tensor."""
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def assert_same_up_to_rounding():
    return _same_up_to_rounding


@pytest.fixture
def open_service(trained_gpt2_dir, tiny_editor_dir, world, tmp_path):
    """open_service(editor=, journal=, leader=, **limits) -> an EditService on the tiny trained model; all closed at the end."""
    from mend.service import EditService, ServiceLimits

    opened = []

    def make(editor=tiny_editor_dir, journal=tmp_path / "journal", leader=None, **limits):
        s = EditService.open(str(trained_gpt2_dir), str(editor) if editor else None, str(journal), device="cpu",
                             locality=world.locality_probes(), limits=ServiceLimits(**limits), n_last_blocks=2, leader=leader)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def gpt2(gpt2_dir):
    return load_model(gpt2_dir, device="cpu")


@pytest.fixture
def llama(llama_dir):
    return load_model(llama_dir, device="cpu")


@pytest.fixture(scope="session")
def trained_gpt2_dir(tmp_path_factory, world_path):
    """A tiny GPT-2 trained on the tiny world by the real base-model builder (~15 s)."""
    out = tmp_path_factory.mktemp("trained_gpt2")
    build_base_model(BaseModelConfig(world_path=str(world_path), vocab_size=400, n_layer=2, n_embd=32, n_head=2,
                                     n_positions=64, epochs=40, eval_every_epochs=40, eval_facts=50, lr=5e-3,
                                     warmup_steps=20, device="cpu"), out)
    return out


@pytest.fixture(scope="session")
def tiny_editor_dir(tmp_path_factory, trained_gpt2_dir, world):
    """A MEND editor meta-trained for the tiny trained GPT-2 (150 steps, ~5 s; greedy reliability ~0.8)."""
    from mend.editor import EditorConfig
    from mend.targets import resolve_targets
    from mend.trainer import TrainConfig, train_editor

    out = tmp_path_factory.mktemp("tiny_editor")
    model, tok = load_model(trained_gpt2_dir, device="cpu")
    train_editor(model, tok, resolve_targets(model, n_last_blocks=2), world.edit_split("train"), world.edit_split("val"), out,
                 EditorConfig(rank=32, step_init=1e-2),
                 TrainConfig(steps=150, batch_sizes=(1, 4), lr=1e-3, step_lr=1e-3, val_every=150, val_edits=10, locality_per_step=8))
    return out


class Postgres:
    """A real PostgreSQL server from Debian's package, started in a temporary directory on loopback
    (as an unprivileged user when the tests run as root: PostgreSQL refuses to run as root)."""

    def __init__(self, bindir, root):
        import pwd
        import socket

        self.bindir, self.root, self.n = bindir, root, 0
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres" if "postgres" in {p.pw_name for p in pwd.getpwall()} else "nobody"
            entry = pwd.getpwnam(self.user)
            os.chown(root, entry.pw_uid, entry.pw_gid)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self._run("initdb", "-D", f"{root}/data", "-U", "mend", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()
        self.url = f"postgresql://mend@127.0.0.1:{self.port}"

    def start(self):
        self._run("pg_ctl", "-D", f"{self.root}/data", "-l", f"{self.root}/log", "-w", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200", "start")

    def _run(self, tool, *args):
        import subprocess

        cmd = [f"{self.bindir}/{tool}", *args]
        subprocess.run((["runuser", "-u", self.user, "--"] if self.user else []) + cmd, check=True, capture_output=True, cwd=self.root)

    def new_database(self) -> str:
        """The URL of a new empty database."""
        import psycopg

        self.n += 1
        with psycopg.connect(f"{self.url}/postgres", autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE journal_{self.n}")
        return f"{self.url}/journal_{self.n}"

    def restart(self, mode="fast"):
        self._run("pg_ctl", "-D", f"{self.root}/data", "-l", f"{self.root}/log", "-m", mode, "-w", "restart", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=200")

    def stop(self, mode="immediate"):
        self._run("pg_ctl", "-D", f"{self.root}/data", "-m", mode, "-w", "stop")


@pytest.fixture(scope="session")
def postgres():
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        message = "PostgreSQL is not installed: install Debian's postgresql package (.ci/run does)"
        pytest.fail(message) if os.environ.get("MEND_REQUIRE_POSTGRES") else pytest.skip(message)
    root = tempfile.mkdtemp(prefix="mend-pg-")
    os.chmod(root, 0o755)
    server = Postgres(os.path.dirname(found[-1]), root)
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_journal(postgres):
    return postgres.new_database()
