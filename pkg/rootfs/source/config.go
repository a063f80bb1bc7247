package source

import (
	"slices"
	"strings"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// EnvVar is one environment variable of the image config.
type EnvVar struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// Config is what a box needs from the image config. The driver stores it
// in the box's box.json record.
type Config struct {
	Env        []EnvVar `json:"env,omitempty"`
	Entrypoint []string `json:"entrypoint,omitempty"`
	Cmd        []string `json:"cmd,omitempty"`
	WorkingDir string   `json:"workingDir,omitempty"`
	User       string   `json:"user,omitempty"`
}

// configFrom extracts a Config from an image config file.
func configFrom(cf *v1.ConfigFile) Config {
	if cf == nil {
		return Config{}
	}
	c := cf.Config
	return Config{
		Env:        parseEnv(c.Env),
		Entrypoint: slices.Clone(c.Entrypoint),
		Cmd:        slices.Clone(c.Cmd),
		WorkingDir: c.WorkingDir,
		User:       c.User,
	}
}

// parseEnv splits each "NAME=value" on the first '=', keeping order.
// Entries without '=' are dropped (the upstream rule: such an entry sets
// nothing). Entries with an empty name ("=x") are dropped too: no process
// can look such a variable up, and passing it on would only confuse the
// guest's environment. Duplicate names are kept, in order.
func parseEnv(env []string) []EnvVar {
	var out []EnvVar
	for _, e := range env {
		k, v, ok := strings.Cut(e, "=")
		if !ok || k == "" {
			continue
		}
		out = append(out, EnvVar{Name: k, Value: v})
	}
	return out
}
