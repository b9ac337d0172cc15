from twisted.application.service import ServiceMaker

evgate = ServiceMaker("evgate", "evgate.tap", "Event-native API gateway for Kafka, MQTT 5 and more.", "evgate")
