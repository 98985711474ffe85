package main

import (
	"fmt"
	"math"
	"sort"
	"strconv"
	"strings"
)

// sample is the repeated measurements of one figure for one contender.
type sample []float64

// summary is what the report shows of a sample: the median and the spread (min to max).
type summary struct {
	N             int
	Median        float64
	Min, Max      float64
	SpreadPercent float64 // (max-min)/median, in percent
}

func summarize(s sample) summary {
	if len(s) == 0 {
		return summary{Median: math.NaN(), Min: math.NaN(), Max: math.NaN(), SpreadPercent: math.NaN()}
	}
	v := append([]float64(nil), s...)
	sort.Float64s(v)
	n := len(v)
	med := v[n/2]
	if n%2 == 0 {
		med = (v[n/2-1] + v[n/2]) / 2
	}
	spread := math.NaN()
	if med != 0 {
		spread = (v[n-1] - v[0]) / math.Abs(med) * 100
	}
	return summary{N: n, Median: med, Min: v[0], Max: v[n-1], SpreadPercent: spread}
}

// ratio is a/b of two medians, NaN when either is missing or b is zero.
func ratio(a, b summary) float64 {
	if a.N == 0 || b.N == 0 || b.Median == 0 {
		return math.NaN()
	}
	return a.Median / b.Median
}

// fmtNum formats v with about three significant digits, which is all a benchmark on a
// shared two-core machine can claim.
func fmtNum(v float64) string {
	switch {
	case math.IsNaN(v) || math.IsInf(v, 0):
		return "–"
	case v == 0:
		return "0"
	}
	a := math.Abs(v)
	switch {
	case a >= 1000:
		return strconv.FormatFloat(math.Round(v), 'f', 0, 64)
	case a >= 100:
		return strconv.FormatFloat(v, 'f', 0, 64)
	case a >= 10:
		return strconv.FormatFloat(v, 'f', 1, 64)
	case a >= 1:
		return strconv.FormatFloat(v, 'f', 2, 64)
	default:
		return strconv.FormatFloat(v, 'g', 2, 64)
	}
}

// fmtSummary renders "median (min–max)", or only the median for a single run.
func fmtSummary(s summary) string {
	if s.N == 0 {
		return "–"
	}
	if s.N == 1 || s.Min == s.Max {
		return fmtNum(s.Median)
	}
	return fmt.Sprintf("%s (%s–%s)", fmtNum(s.Median), fmtNum(s.Min), fmtNum(s.Max))
}

func fmtRatio(r float64) string {
	if math.IsNaN(r) || math.IsInf(r, 0) {
		return "–"
	}
	return fmtNum(r) + "×"
}

// parseSize reads sizes such as 128MiB, 40MB, 1.5GiB, 4096 (bytes).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	units := []struct {
		suffix string
		mult   float64
	}{
		{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30},
		{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9},
		{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"B", 1},
	}
	mult := 1.0
	for _, u := range units {
		if strings.HasSuffix(t, u.suffix) {
			t = strings.TrimSpace(strings.TrimSuffix(t, u.suffix))
			mult = u.mult
			break
		}
	}
	f, err := strconv.ParseFloat(t, 64)
	if err != nil || f < 0 || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, fmt.Errorf("bad size %q (want e.g. 128MiB, 40MB or a byte count)", s)
	}
	return int64(f * mult), nil
}

// sizeFlag is a flag.Value for byte sizes.
type sizeFlag int64

func (s *sizeFlag) String() string { return fmtBytes(int64(*s)) }
func (s *sizeFlag) Set(v string) error {
	n, err := parseSize(v)
	if err != nil {
		return err
	}
	*s = sizeFlag(n)
	return nil
}

func fmtBytes(n int64) string {
	switch {
	case n >= 1<<30 && n%(1<<30) == 0:
		return fmt.Sprintf("%dGiB", n>>30)
	case n >= 1<<20 && n%(1<<20) == 0:
		return fmt.Sprintf("%dMiB", n>>20)
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	}
	return fmt.Sprintf("%dB", n)
}
