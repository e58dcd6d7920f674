module smartvm/agent-native

go 1.19
