// Command numbersvc-check is a Go client of numbersvc: it lists one page of a typed search,
// streams the whole search, gets the first group, rents a number twice under one request id
// (only with -rent), and sends one invalid request, then prints one JSON object with what it
// saw. It asserts nothing itself: tests/polyglot/test_go_client.py compares the output with
// what the Python client sees on the same server.
//
//	go run . -target 127.0.0.1:50051 [-rent] [-request-id UUID] [-deadline-seconds 10]
//
// The stubs come from protos/ (`make clients` generates them into gen/); google.type.Money
// and the google.rpc details are genproto's. Exit status: 0 when every call behaved as a
// call (an RPC error of the get or the invalid request included in the JSON), 1 otherwise.
package main

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	rpccode "google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/genproto/googleapis/type/money"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	pb "numbersvc.dev/clients/go/gen/numbersvc/v1"
)

// pageSize walks the search a handful of pages at a time.
const pageSize = 5

// filter is the search every call makes: typed enums, not strings.
func filter() *pb.SearchFilter {
	return &pb.SearchFilter{
		RegionCode: "US",
		NumberType: pb.NumberType_NUMBER_TYPE_LOCAL,
		Region:     "NY",
		Services:   []pb.NumberService{pb.NumberService_NUMBER_SERVICE_SMS},
	}
}

func main() {
	target := flag.String("target", "127.0.0.1:50051", "numbersvc's address, host:port")
	rent := flag.Bool("rent", false, "rent one number, twice under one request id (spends money)")
	requestID := flag.String("request-id", "", "the rent's request id (default: a new UUID)")
	deadline := flag.Float64("deadline-seconds", 10, "deadline of each call")
	flag.Parse()
	if *requestID == "" {
		*requestID = newUUID()
	}

	conn, err := grpc.NewClient(*target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fail(err)
	}
	defer conn.Close()
	c := checker{pb.NewNumberGroupServiceClient(conn), time.Duration(*deadline * float64(time.Second))}

	seen, err := c.run(*target, *rent, *requestID)
	if err != nil {
		fail(err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(seen); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "numbersvc-check:", err)
	os.Exit(1)
}

type checker struct {
	client   pb.NumberGroupServiceClient
	deadline time.Duration
}

// call gives each call a fresh deadline.
func (c checker) call() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), c.deadline)
}

func (c checker) run(target string, rent bool, requestID string) (map[string]any, error) {
	seen := map[string]any{"target": target}

	// ListNumberGroups: the first page.
	ctx, cancel := c.call()
	defer cancel()
	page, err := c.client.ListNumberGroups(ctx, &pb.ListNumberGroupsRequest{Filter: filter(), PageSize: pageSize})
	if err != nil {
		return nil, fmt.Errorf("ListNumberGroups: %w", err)
	}
	seen["list"] = map[string]any{
		"filter":          filterJSON(filter()),
		"total_size":      page.GetTotalSize(),
		"next_page_token": page.GetNextPageToken(),
		"groups":          groupsJSON(page.GetNumberGroups()),
	}

	// StreamNumberGroups: the whole search, to its end.
	if seen["stream"], err = c.stream(); err != nil {
		return nil, fmt.Errorf("StreamNumberGroups: %w", err)
	}

	// GetNumberGroup: the first group, or the rich error it failed with.
	if len(page.GetNumberGroups()) == 0 {
		return nil, errors.New("the search found no groups")
	}
	first := page.GetNumberGroups()[0]
	ctx, cancel = c.call()
	defer cancel()
	got, err := c.client.GetNumberGroup(ctx, &pb.GetNumberGroupRequest{GroupId: first.GetGroupId()})
	seen["get"] = outcome(groupJSON(got.GetNumberGroup()), err)

	// RentNumbers, only when asked: one number from the first group in stock, then the same
	// request again, which must give the same order back and rent nothing more.
	seen["rent"] = nil
	if rent {
		if seen["rent"], err = c.rentTwice(page.GetNumberGroups(), requestID); err != nil {
			return nil, fmt.Errorf("RentNumbers: %w", err)
		}
	}

	// One rich error: an invalid region code is INVALID_ARGUMENT with a BadRequest.
	ctx, cancel = c.call()
	defer cancel()
	_, err = c.client.ListNumberGroups(ctx, &pb.ListNumberGroupsRequest{Filter: &pb.SearchFilter{RegionCode: "ZZ"}})
	if err == nil {
		return nil, errors.New("ListNumberGroups with region code ZZ succeeded")
	}
	seen["invalid_region"] = describe(err)
	return seen, nil
}

func (c checker) stream() (map[string]any, error) {
	ctx, cancel := c.call()
	defer cancel()
	stream, err := c.client.StreamNumberGroups(ctx, &pb.StreamNumberGroupsRequest{Filter: filter(), PageSize: pageSize})
	if err != nil {
		return nil, err
	}
	var messages, totalSize int32
	ids := []string{}
	lastToken := ""
	for {
		message, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, err
		}
		messages++
		totalSize = message.GetTotalSize()
		lastToken = message.GetNextPageToken()
		for _, group := range message.GetNumberGroups() {
			ids = append(ids, group.GetGroupId())
		}
	}
	return map[string]any{
		"messages":             messages,
		"groups":               len(ids),
		"group_ids":            ids,
		"total_size":           totalSize,
		"last_next_page_token": lastToken,
	}, nil
}

func (c checker) rentTwice(groups []*pb.NumberGroup, requestID string) (map[string]any, error) {
	var group *pb.NumberGroup
	for _, candidate := range groups {
		if candidate.GetStock() > 0 {
			group = candidate
			break
		}
	}
	if group == nil {
		return nil, errors.New("no group on the first page has stock")
	}
	request := &pb.RentNumbersRequest{GroupId: group.GetGroupId(), Quantity: 1, RequestId: requestID}
	orders := map[string]any{}
	for _, attempt := range []string{"first", "repeat"} {
		ctx, cancel := c.call()
		response, err := c.client.RentNumbers(ctx, request)
		cancel()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", attempt, err)
		}
		orders[attempt] = orderJSON(response.GetOrder())
	}
	return orders, nil
}

// outcome is {"value": ...} for a call that succeeded, {"error": ...} for one that failed.
func outcome(value any, err error) map[string]any {
	if err != nil {
		return map[string]any{"error": describe(err)}
	}
	return map[string]any{"value": value}
}

// describe decodes a failed call's google.rpc.Status: code, message and the details this
// service sends (ErrorInfo always; BadRequest or RetryInfo where they fit).
func describe(err error) map[string]any {
	st, ok := status.FromError(err)
	if !ok {
		return map[string]any{"not_an_rpc_error": err.Error()}
	}
	out := map[string]any{
		"code":             rpccode.Code(st.Code()).String(),
		"code_number":      int32(st.Code()),
		"message":          st.Message(),
		"detail_types":     []string{},
		"error_info":       nil,
		"field_violations": []any{},
		"retry_delay":      nil,
	}
	types := []string{}
	for _, detail := range st.Details() {
		switch d := detail.(type) {
		case *errdetails.ErrorInfo:
			types = append(types, "google.rpc.ErrorInfo")
			metadata := d.GetMetadata()
			if metadata == nil {
				metadata = map[string]string{} // {} in the JSON, as the other clients print it
			}
			out["error_info"] = map[string]any{"domain": d.GetDomain(), "reason": d.GetReason(), "metadata": metadata}
		case *errdetails.BadRequest:
			types = append(types, "google.rpc.BadRequest")
			violations := []any{}
			for _, v := range d.GetFieldViolations() {
				violations = append(violations, map[string]any{"field": v.GetField(), "description": v.GetDescription()})
			}
			out["field_violations"] = violations
		case *errdetails.RetryInfo:
			types = append(types, "google.rpc.RetryInfo")
			delay := d.GetRetryDelay()
			out["retry_delay"] = decimal(delay.GetSeconds(), delay.GetNanos())
		case error: // a detail whose type this program does not link in
			types = append(types, "undecodable: "+d.Error())
		default:
			types = append(types, fmt.Sprintf("%T", d))
		}
	}
	out["detail_types"] = types
	return out
}

func filterJSON(f *pb.SearchFilter) map[string]any {
	return map[string]any{
		"region_code": f.GetRegionCode(),
		"number_type": f.GetNumberType().String(),
		"region":      f.GetRegion(),
		"services":    serviceNames(f.GetServices()),
	}
}

func groupsJSON(groups []*pb.NumberGroup) []any {
	out := []any{}
	for _, group := range groups {
		out = append(out, groupJSON(group))
	}
	return out
}

func groupJSON(g *pb.NumberGroup) map[string]any {
	return map[string]any{
		"group_id":    g.GetGroupId(),
		"number_type": g.GetNumberType().String(),
		"prefix":      g.GetPrefix(),
		"region":      g.GetRegion(),
		"stock":       fmt.Sprint(g.GetStock()), // int64: a string, as protobuf's JSON does
		"services":    serviceNames(g.GetServices()),
		"rental_rate": moneyJSON(g.GetRentalRate()),
		"setup_rate":  moneyJSON(g.GetSetupRate()),
		"voice_rate":  moneyJSON(g.GetVoiceRate()),
		"sms_rate":    moneyJSON(g.GetSmsRate()),
	}
}

func serviceNames(services []pb.NumberService) []string {
	names := []string{}
	for _, service := range services {
		names = append(names, service.String())
	}
	return names
}

func orderJSON(o *pb.RentalOrder) map[string]any {
	numbers := []string{}
	for _, number := range o.GetNumbers() {
		numbers = append(numbers, number.GetE164())
	}
	created := o.GetCreateTime()
	return map[string]any{
		"status":              o.GetStatus().String(),
		"request_id":          o.GetRequestId(),
		"group_id":            o.GetGroupId(),
		"quantity":            o.GetQuantity(),
		"numbers":             numbers,
		"upstream_request_id": o.GetUpstreamRequestId(),
		"create_time":         decimal(created.GetSeconds(), created.GetNanos()),
	}
}

// moneyJSON is an amount as an exact decimal string, or nil when the field is unset.
func moneyJSON(m *money.Money) any {
	if m == nil {
		return nil
	}
	return map[string]any{"currency_code": m.GetCurrencyCode(), "amount": decimal(m.GetUnits(), m.GetNanos())}
}

// decimal writes units + nanos/1e9 exactly (no float): at least two fraction digits, no
// trailing zeros beyond them. Money and Duration both keep units and nanos of one sign.
func decimal(units int64, nanos int32) string {
	sign := ""
	if units < 0 || nanos < 0 {
		sign = "-"
	}
	whole := uint64(units)
	if units < 0 {
		whole = -whole // two's complement: exact even for math.MinInt64
	}
	if nanos < 0 {
		nanos = -nanos
	}
	fraction := strings.TrimRight(fmt.Sprintf("%09d", nanos), "0")
	for len(fraction) < 2 {
		fraction += "0"
	}
	return fmt.Sprintf("%s%d.%s", sign, whole, fraction)
}

// newUUID is a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		fail(err)
	}
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
