package testenv

import (
	"strings"
	"testing"
)

func TestMetricsSum(t *testing.T) {
	const scrape = `# HELP node_mirror_requests_total Pull API requests.
# TYPE node_mirror_requests_total counter
node_mirror_requests_total{kind="blob",registry="docker.io",result="hit"} 3
node_mirror_requests_total{kind="blob",registry="docker.io",result="miss"} 4
node_mirror_requests_total{kind="manifest",registry="docker.io",result="stale"} 1
node_mirror_requests_total{kind="blob",registry="ghcr.io",result="hit"} 100
node_mirror_requests_total_other{kind="blob"} 1000
node_mirror_inflight_downloads 2
`
	ms, err := parseMetrics(strings.NewReader(scrape))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		labels []string
		want   float64
	}{
		{"node_mirror_requests_total", nil, 108},
		{"node_mirror_requests_total", []string{"registry=docker.io"}, 8},
		{"node_mirror_requests_total", []string{"registry=docker.io", "kind=blob"}, 7},
		{"node_mirror_requests_total", []string{"kind=blob", "result=hit"}, 103},
		{"node_mirror_requests_total", []string{"result=hi"}, 0}, // values match whole
		{"node_mirror_requests_total", []string{"registry=docker.io", "kind=tags"}, 0},
		{"node_mirror_inflight_downloads", nil, 2},
		{"node_mirror_absent", nil, 0},
	} {
		if got := ms.Sum(tc.name, tc.labels...); got != tc.want {
			t.Errorf("Sum(%s, %v) = %v, want %v", tc.name, tc.labels, got, tc.want)
		}
	}
	if _, err := parseMetrics(strings.NewReader("node_mirror_x{a=\"b\"} notanumber\n")); err == nil {
		t.Error("a sample without a number parsed")
	}
}
