package config

import (
	"os"
	"strings"
	"testing"
)

// The shipped example must stay loadable and valid.
func TestExampleConfig(t *testing.T) {
	c, err := Load("../../examples/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(c.Registries) != 4 || c.Registries[0].Endpoints[0] != "https://registry-1.docker.io" {
		t.Fatalf("example registries: %+v", c.Registries)
	}
}

// The example's commented [fleet] table documents real keys: uncommented, it loads and
// validates.
func TestExampleFleetTable(t *testing.T) {
	b, err := os.ReadFile("../../examples/config.toml")
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	i := strings.Index(s, "# [fleet]")
	if i < 0 {
		t.Fatal("the example has no [fleet] table")
	}
	var out []string
	for _, l := range strings.Split(s[i:], "\n") {
		if !strings.HasPrefix(l, "# ") {
			break
		}
		out = append(out, strings.TrimPrefix(l, "# "))
	}
	c, err := Load(write(t, strings.Join(out, "\n")+"\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	if !c.Fleet.Enabled() || c.Fleet.KeyFile == "" || len(c.Fleet.Join) != 1 {
		t.Fatalf("fleet table: %+v", c.Fleet)
	}
}
