"""`tandem demo`: the whole system on one machine, in one command.

The orchestrator (`story`) builds what the story needs, starts the cloud tier, a broker, the
fleet service and simulated devices (`launch`) as child processes it supervises (`processes`),
drives a good and a bad rollout through the fleet's REST API and prints a summary (`summary`). The
device simulators are the device half: real agents and SDK clients, so they live on the device
side (`tandem.agent.simulator`) and run as their own processes; the cloud never imports them.
"""
