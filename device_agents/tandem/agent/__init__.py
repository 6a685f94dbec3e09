"""The device agent: MQTT session, delivery, verification, activation, rollback.

    from tandem.agent import Agent, AgentConfig, BrokerAddress
    agent = Agent(AgentConfig(device_id="dev-1", broker=BrokerAddress.parse("mqtt://h:1883"),
                              store=Path("store"), trusted_keys=(Path("signing.pub"),))).start()
    ...
    agent.stop()

The protocol it speaks is documented in docs/protocol.md.
"""

from tandem.agent.agent import Agent
from tandem.agent.config import AgentConfig, BrokerAddress

__all__ = ["Agent", "AgentConfig", "BrokerAddress"]
