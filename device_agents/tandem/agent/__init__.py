"""The device agent: MQTT session, delivery, verification, activation, rollback."""
