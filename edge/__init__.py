"""Edge-to-cloud uplink and protocol bridges (MQTT, NATS): built on the node package."""
