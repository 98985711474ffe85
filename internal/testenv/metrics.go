package testenv

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Metrics is one scrape of the mirror's /metrics: each sample's value by series, the
// series written as Prometheus writes it (name{label="value",...}).
type Metrics map[string]float64

// Metrics scrapes the mirror's /metrics and fails the test if that fails.
func (m *Mirror) Metrics(t testing.TB) Metrics {
	t.Helper()
	client := &http.Client{Timeout: 30 * time.Second}
	resp, err := client.Get(m.URL + "/metrics")
	if err != nil {
		t.Fatalf("scrape %s/metrics: %v", m.URL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scrape %s/metrics: %s", m.URL, resp.Status)
	}
	ms, err := parseMetrics(resp.Body)
	if err != nil {
		t.Fatalf("scrape %s/metrics: %v", m.URL, err)
	}
	return ms
}

// parseMetrics reads the Prometheus text format: comments are skipped, every other line
// is a series and a value (node-mirror writes no timestamps).
func parseMetrics(r io.Reader) (Metrics, error) {
	ms := Metrics{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			return nil, fmt.Errorf("metrics line %q: no value", line)
		}
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			return nil, fmt.Errorf("metrics line %q: %w", line, err)
		}
		ms[line[:i]] = v
	}
	return ms, sc.Err()
}

// Sum adds the samples of metric name whose labels include every label in want
// ("key=value" each).
func (ms Metrics) Sum(name string, want ...string) float64 {
	var sum float64
	for series, v := range ms {
		n, labels, _ := strings.Cut(series, "{")
		if n != name {
			continue
		}
		labels = strings.TrimSuffix(labels, "}")
		ok := true
		for _, w := range want {
			k, val, _ := strings.Cut(w, "=")
			if !strings.Contains(","+labels+",", ","+k+"="+strconv.Quote(val)+",") {
				ok = false
				break
			}
		}
		if ok {
			sum += v
		}
	}
	return sum
}
