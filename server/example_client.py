"""The README's client example: edit a fact on a running server, query it, roll the edit back.

    python -m server.example_client 127.0.0.1:50051
"""

import sys

from mend.records import EditRecord
from server.client import EditClient


def main(address: str = "127.0.0.1:50051") -> None:
    with EditClient(address) as client:
        client.wait_ready()
        info = client.info()
        print(f"server at {address}: {info.model_type} model {info.base_model_hash[:12]}, revision {info.model_revision}")
        prompt, paraphrase = "Biokfae Vurthes was born in", "Biokfae Vurthes is a native of"  # a test-split person
        print(f"  before: {prompt!r} -> {client.generate(prompt, 3)!r}")

        reply = client.apply(EditRecord(prompt=prompt, target_new="Drelkio", rephrase_prompt=(paraphrase,)))
        print(f"  applied {reply.edit_id} -> revision {reply.model_revision}; reliability "
              f"{reply.before.reliability_em:.0f} -> {reply.after.reliability_em:.0f}, generality "
              f"{reply.before.generality_em:.0f} -> {reply.after.generality_em:.0f}, locality {reply.after.locality_em:.2f}")
        print(f"  after:  {prompt!r} -> {client.generate(prompt, 3)!r}")
        print(f"          {paraphrase!r} -> {client.generate(paraphrase, 3)!r}")
        print(f"          P('Drelkio') = {client.score(prompt, 'Drelkio').probability:.3f}")

        revision = client.rollback(reply.edit_id)
        print(f"  rolled back {reply.edit_id} -> revision {revision}: {prompt!r} -> {client.generate(prompt, 3)!r}")


if __name__ == "__main__":
    main(*sys.argv[1:])
