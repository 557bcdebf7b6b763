package dev.numbersvc.check;

import com.google.gson.Gson;
import com.google.gson.GsonBuilder;
import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.protobuf.Timestamp;
import com.google.rpc.BadRequest;
import com.google.rpc.ErrorInfo;
import com.google.rpc.RetryInfo;
import com.google.type.Money;
import dev.numbersvc.v1.GetNumberGroupRequest;
import dev.numbersvc.v1.ListNumberGroupsRequest;
import dev.numbersvc.v1.ListNumberGroupsResponse;
import dev.numbersvc.v1.NumberGroup;
import dev.numbersvc.v1.NumberGroupServiceGrpc;
import dev.numbersvc.v1.NumberGroupServiceGrpc.NumberGroupServiceBlockingStub;
import dev.numbersvc.v1.NumberService;
import dev.numbersvc.v1.NumberType;
import dev.numbersvc.v1.RentNumbersRequest;
import dev.numbersvc.v1.RentalOrder;
import dev.numbersvc.v1.RentedNumber;
import dev.numbersvc.v1.SearchFilter;
import dev.numbersvc.v1.StreamNumberGroupsRequest;
import dev.numbersvc.v1.StreamNumberGroupsResponse;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import java.math.BigDecimal;
import java.util.ArrayList;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;

/**
 * A Java client of numbersvc: lists one page of a typed search, streams the whole search, gets
 * the first group, rents a number twice under one request id (only with {@code --rent}), and
 * sends one invalid request, then prints one JSON object with what it saw. It asserts nothing
 * itself: tests/polyglot/test_java_client.py compares the output with what the Python client
 * sees on the same server.
 *
 * <pre>
 * java -jar target/numbersvc-check.jar --target 127.0.0.1:50051 [--rent] [--request-id UUID]
 *     [--deadline-seconds 10]
 * </pre>
 *
 * <p>Exit status: 0 when every call behaved as a call (an RPC error of the get or the invalid
 * request included in the JSON), 1 otherwise.
 */
public final class Check {
  /** Walks the search a handful of pages at a time. */
  private static final int PAGE_SIZE = 5;

  /** The search every call makes: typed enums, not strings. */
  private static final SearchFilter FILTER =
      SearchFilter.newBuilder()
          .setRegionCode("US")
          .setNumberType(NumberType.NUMBER_TYPE_LOCAL)
          .setRegion("NY")
          .addServices(NumberService.NUMBER_SERVICE_SMS)
          .build();

  private final NumberGroupServiceBlockingStub stub;
  private final long deadlineMillis;

  private Check(NumberGroupServiceBlockingStub stub, long deadlineMillis) {
    this.stub = stub;
    this.deadlineMillis = deadlineMillis;
  }

  public static void main(String[] argv) throws InterruptedException {
    Map<String, String> args = parse(argv);
    String target = args.getOrDefault("target", "127.0.0.1:50051");
    String requestId = args.getOrDefault("request-id", UUID.randomUUID().toString());
    double deadlineSeconds = Double.parseDouble(args.getOrDefault("deadline-seconds", "10"));

    ManagedChannel channel = ManagedChannelBuilder.forTarget(target).usePlaintext().build();
    try {
      long deadlineMillis = (long) (deadlineSeconds * 1000);
      Check check = new Check(NumberGroupServiceGrpc.newBlockingStub(channel), deadlineMillis);
      Map<String, Object> seen = check.run(target, args.containsKey("rent"), requestId);
      Gson gson = new GsonBuilder().serializeNulls().disableHtmlEscaping().create();
      System.out.println(gson.toJson(seen));
    } finally {
      channel.shutdownNow().awaitTermination(5, TimeUnit.SECONDS);
    }
  }

  /** {@code --name value} pairs, and {@code --rent} alone; anything else is a usage error. */
  private static Map<String, String> parse(String[] argv) {
    Map<String, String> args = new LinkedHashMap<>();
    for (int i = 0; i < argv.length; i++) {
      String name = argv[i];
      if (name.equals("--rent")) {
        args.put("rent", "true");
      } else if (List.of("--target", "--request-id", "--deadline-seconds").contains(name)
          && i + 1 < argv.length) {
        args.put(name.substring(2), argv[++i]);
      } else {
        System.err.println("usage: numbersvc-check [--target HOST:PORT] [--rent]"
            + " [--request-id UUID] [--deadline-seconds N]");
        System.exit(2);
      }
    }
    return args;
  }

  /** The stub with a fresh deadline for one call. */
  private NumberGroupServiceBlockingStub call() {
    return stub.withDeadlineAfter(deadlineMillis, TimeUnit.MILLISECONDS);
  }

  private Map<String, Object> run(String target, boolean rent, String requestId) {
    Map<String, Object> seen = new LinkedHashMap<>();
    seen.put("target", target);

    // ListNumberGroups: the first page.
    ListNumberGroupsResponse page =
        call().listNumberGroups(
            ListNumberGroupsRequest.newBuilder().setFilter(FILTER).setPageSize(PAGE_SIZE).build());
    Map<String, Object> list = new LinkedHashMap<>();
    list.put("filter", filterJson(FILTER));
    list.put("total_size", page.getTotalSize());
    list.put("next_page_token", page.getNextPageToken());
    list.put("groups", page.getNumberGroupsList().stream().map(Check::groupJson).toList());
    seen.put("list", list);

    // StreamNumberGroups: the whole search, to its end.
    seen.put("stream", stream());

    // GetNumberGroup: the first group, or the rich error it failed with.
    if (page.getNumberGroupsCount() == 0) {
      throw new IllegalStateException("the search found no groups");
    }
    String firstId = page.getNumberGroups(0).getGroupId();
    seen.put(
        "get",
        outcome(
            () ->
                groupJson(
                    call()
                        .getNumberGroup(
                            GetNumberGroupRequest.newBuilder().setGroupId(firstId).build())
                        .getNumberGroup())));

    // RentNumbers, only when asked: one number from the first group in stock, then the same
    // request again, which must give the same order back and rent nothing more.
    seen.put("rent", rent ? rentTwice(page.getNumberGroupsList(), requestId) : null);

    // One rich error: an invalid region code is INVALID_ARGUMENT with a BadRequest.
    try {
      call()
          .listNumberGroups(
              ListNumberGroupsRequest.newBuilder()
                  .setFilter(SearchFilter.newBuilder().setRegionCode("ZZ"))
                  .build());
      throw new IllegalStateException("ListNumberGroups with region code ZZ succeeded");
    } catch (StatusRuntimeException e) {
      seen.put("invalid_region", describe(e));
    }
    return seen;
  }

  private Map<String, Object> stream() {
    Iterator<StreamNumberGroupsResponse> messages =
        call()
            .streamNumberGroups(
                StreamNumberGroupsRequest.newBuilder()
                    .setFilter(FILTER)
                    .setPageSize(PAGE_SIZE)
                    .build());
    int count = 0;
    int totalSize = 0;
    String lastToken = "";
    List<String> ids = new ArrayList<>();
    while (messages.hasNext()) { // an RPC error throws here, and fails the program
      StreamNumberGroupsResponse message = messages.next();
      count++;
      totalSize = message.getTotalSize();
      lastToken = message.getNextPageToken();
      message.getNumberGroupsList().forEach(group -> ids.add(group.getGroupId()));
    }
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("messages", count);
    out.put("groups", ids.size());
    out.put("group_ids", ids);
    out.put("total_size", totalSize);
    out.put("last_next_page_token", lastToken);
    return out;
  }

  private Map<String, Object> rentTwice(List<NumberGroup> groups, String requestId) {
    NumberGroup group =
        groups.stream()
            .filter(candidate -> candidate.getStock() > 0)
            .findFirst()
            .orElseThrow(() -> new IllegalStateException("no group on the first page has stock"));
    RentNumbersRequest request =
        RentNumbersRequest.newBuilder()
            .setGroupId(group.getGroupId())
            .setQuantity(1)
            .setRequestId(requestId)
            .build();
    Map<String, Object> orders = new LinkedHashMap<>();
    for (String attempt : List.of("first", "repeat")) {
      orders.put(attempt, orderJson(call().rentNumbers(request).getOrder()));
    }
    return orders;
  }

  /** {"value": ...} for a call that succeeded, {"error": ...} for one that failed. */
  private static Map<String, Object> outcome(Supplier<Object> call) {
    try {
      return Map.of("value", call.get());
    } catch (StatusRuntimeException e) {
      return Map.of("error", describe(e));
    }
  }

  /**
   * Decodes a failed call's google.rpc.Status: code, message and the details this service sends
   * (ErrorInfo always; BadRequest or RetryInfo where they fit).
   */
  private static Map<String, Object> describe(StatusRuntimeException e) {
    Status status = Status.fromThrowable(e);
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("code", status.getCode().name());
    out.put("code_number", status.getCode().value());
    out.put("message", status.getDescription());
    out.put("detail_types", new ArrayList<String>());
    out.put("error_info", null);
    out.put("field_violations", List.of());
    out.put("retry_delay", null);
    com.google.rpc.Status rich = StatusProto.fromThrowable(e);
    if (rich == null) {
      return out; // no grpc-status-details-bin: the code and message are all there is
    }
    List<String> types = new ArrayList<>();
    try {
      for (Any detail : rich.getDetailsList()) {
        if (detail.is(ErrorInfo.class)) {
          ErrorInfo info = detail.unpack(ErrorInfo.class);
          types.add("google.rpc.ErrorInfo");
          Map<String, Object> infoJson = new LinkedHashMap<>();
          infoJson.put("domain", info.getDomain());
          infoJson.put("reason", info.getReason());
          infoJson.put("metadata", info.getMetadataMap());
          out.put("error_info", infoJson);
        } else if (detail.is(BadRequest.class)) {
          types.add("google.rpc.BadRequest");
          out.put(
              "field_violations",
              detail.unpack(BadRequest.class).getFieldViolationsList().stream()
                  .map(v -> Map.of("field", v.getField(), "description", v.getDescription()))
                  .toList());
        } else if (detail.is(RetryInfo.class)) {
          types.add("google.rpc.RetryInfo");
          com.google.protobuf.Duration delay = detail.unpack(RetryInfo.class).getRetryDelay();
          out.put("retry_delay", decimal(delay.getSeconds(), delay.getNanos()));
        } else {
          types.add(detail.getTypeUrl().substring(detail.getTypeUrl().lastIndexOf('/') + 1));
        }
      }
    } catch (InvalidProtocolBufferException bad) {
      throw new IllegalStateException("undecodable error detail", bad);
    }
    out.put("detail_types", types);
    return out;
  }

  private static Map<String, Object> filterJson(SearchFilter filter) {
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("region_code", filter.getRegionCode());
    out.put("number_type", filter.getNumberType().name());
    out.put("region", filter.getRegion());
    out.put("services", filter.getServicesList().stream().map(NumberService::name).toList());
    return out;
  }

  private static Map<String, Object> groupJson(NumberGroup group) {
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("group_id", group.getGroupId());
    out.put("number_type", group.getNumberType().name());
    out.put("prefix", group.getPrefix());
    out.put("region", group.getRegion());
    out.put("stock", Long.toString(group.getStock())); // int64: a string, as protobuf's JSON
    out.put("services", group.getServicesList().stream().map(NumberService::name).toList());
    out.put("rental_rate", group.hasRentalRate() ? moneyJson(group.getRentalRate()) : null);
    out.put("setup_rate", group.hasSetupRate() ? moneyJson(group.getSetupRate()) : null);
    out.put("voice_rate", group.hasVoiceRate() ? moneyJson(group.getVoiceRate()) : null);
    out.put("sms_rate", group.hasSmsRate() ? moneyJson(group.getSmsRate()) : null);
    return out;
  }

  private static Map<String, Object> orderJson(RentalOrder order) {
    Map<String, Object> out = new LinkedHashMap<>();
    out.put("status", order.getStatus().name());
    out.put("request_id", order.getRequestId());
    out.put("group_id", order.getGroupId());
    out.put("quantity", order.getQuantity());
    out.put("numbers", order.getNumbersList().stream().map(RentedNumber::getE164).toList());
    out.put("upstream_request_id", order.getUpstreamRequestId());
    Timestamp created = order.getCreateTime();
    out.put("create_time", decimal(created.getSeconds(), created.getNanos()));
    return out;
  }

  private static Map<String, Object> moneyJson(Money money) {
    String amount = decimal(money.getUnits(), money.getNanos());
    return Map.of("currency_code", money.getCurrencyCode(), "amount", amount);
  }

  /**
   * units + nanos/1e9 exactly (BigDecimal, never a double): at least two fraction digits, no
   * trailing zeros beyond them. Money and Duration both keep units and nanos of one sign.
   */
  static String decimal(long units, int nanos) {
    BigDecimal value =
        BigDecimal.valueOf(units).add(BigDecimal.valueOf(nanos, 9)).stripTrailingZeros();
    return value.setScale(Math.max(2, value.scale())).toPlainString();
  }
}
