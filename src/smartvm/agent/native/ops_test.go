// Tests of small helpers: the boot time of HELLO (ops.go) and the agent port count (main.go).
package main

import (
	"os"
	"strconv"
	"strings"
	"testing"
)

func TestBootTimeIsProcStatBtime(t *testing.T) {
	data, err := os.ReadFile("/proc/stat")
	if err != nil {
		t.Skip("no /proc/stat")
	}
	for _, line := range strings.Split(string(data), "\n") {
		if strings.HasPrefix(line, "btime ") {
			want, _ := strconv.ParseFloat(strings.TrimSpace(line[6:]), 64)
			got, _ := bootTime().(float64)
			if got < want-1 || got > want+1 { // the kernel floors the same difference; reads straddle
				t.Fatalf("bootTime() = %v, /proc/stat says %v", got, want)
			}
			return
		}
	}
	t.Fatal("/proc/stat has no btime")
}

func TestAnnouncedPortCount(t *testing.T) {
	for cmdline, want := range map[string]int{
		"console=ttyS0 smartvm.agent_ports=8 quiet\n":  8,
		"smartvm.agent_ports=1":                        1,
		"console=ttyS0":                                0,
		"smartvm.agent_ports=x smartvm.agent_ports=-2": 0,
		"smartvm.agent_ports=":                         0,
	} {
		if got := portsIn(cmdline); got != want {
			t.Errorf("portsIn(%q) = %d, want %d", cmdline, got, want)
		}
	}
}
