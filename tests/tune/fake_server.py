"""`python -m tests.tune.fake_server DATA_DIR PORT`: a server with the files and fine-tuning API over a
stand-in engine and the fast stand-in trainer, for tests that kill it and start it again."""

from __future__ import annotations

import sys

import uvicorn

from ember.server.app import ServerState, create_app
from ember.server.tuning_api import Tuning
from tests.server.test_tuning import FAKES, MODEL, TuneEngine


def main() -> None:
    data_dir, port = sys.argv[1], int(sys.argv[2])
    engine = TuneEngine()
    state = ServerState()
    tuning = Tuning(data_dir, f"sqlite:///{data_dir}/ember.db", engine, MODEL, state.adapter_owners, 1 << 20)
    tuning.runner.trainer = tuning.runner.data = FAKES
    state.tuning = tuning
    uvicorn.run(create_app(engine, MODEL, state), host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main()
