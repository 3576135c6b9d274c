"""The agent's own nkey: created on first start, then only read."""

from __future__ import annotations

import logging

from agentd.config import AgentConfig
from bus import Signer, generate_seed, write_seed_file
from bus.paths import private_dir

logger = logging.getLogger(__name__)


def ensure_identity(config: AgentConfig) -> Signer:
    """Load the agent's key, creating it (mode 0400) if it does not exist yet; make sure
    the data directory is 0700.

    Raises:
        SecretFileError: the key file exists but is unsafe or invalid.
    """
    path = config.key_path
    private_dir(config.data_dir)  # journal, seals, scripts: nobody else's business
    if not path.exists():
        write_seed_file(path, generate_seed())
        signer = Signer.from_file(path)
        logger.warning(
            "created the identity of agent %s: public key %s (register it with the master)",
            config.id,
            signer.public_key,
        )
        return signer
    return Signer.from_file(path)
